"""Hot-swap (lorakit.hotswap): adapters of other ranks and alphas swap into a compiled model without a
recompilation (torch._dynamo counters), with outputs equal to loading each adapter afresh."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lorakit import LoraConfig, inject, load_adapter, read_adapter, save_adapter
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.hotswap import hotswap_adapter, prepare_for_hotswap
from tiny import ids, randomize_lora, tiny_llama

CONFIGS = {
    "a": LoraConfig(r=4, alpha=8),
    "b": LoraConfig(r=6, alpha=3, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}),
    "c": LoraConfig(r=2, alpha=5, use_rslora=True),
}


@pytest.fixture
def files(tmp_path):
    paths = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = tiny_llama()
        inject(model, config)
        randomize_lora(model, seed=i + 1)
        paths[name] = save_adapter(model, tmp_path / name)
    return paths


def _eager(path) -> torch.Tensor:
    with torch.no_grad():
        return load_adapter(tiny_llama(), path)(ids()).logits


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_swaps_of_other_ranks_and_alphas_do_not_recompile(files, tmp_path):
    model = load_adapter(tiny_llama(), files["a"])
    prepare_for_hotswap(model, rank=8)
    x = ids()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, _eager(files["a"]), atol=1e-6)  # padding changes nothing
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager")
        assert torch.allclose(compiled(x).logits, _eager(files["a"]), atol=1e-6)
        graphs = _graphs()
        assert graphs >= 1
        for name in ("b", "c", "a"):
            hotswap_adapter(model, files[name])
            assert torch.allclose(compiled(x).logits, _eager(files[name]), atol=1e-5), name
        assert _graphs() == graphs  # three swaps (ranks 6/2, alphas 3/5, rsLoRA): no new graph
    saved = save_adapter(model, tmp_path / "swapped")  # the padded adapter saves as a valid file
    assert read_adapter(saved).config.r == 8 and torch.allclose(_eager(saved), _eager(files["a"]), atol=1e-5)


def test_the_counter_sees_a_recompilation_without_preparation(files):
    """Control: changing what the unprepared layers read (their scaling float) recompiles."""
    model = load_adapter(tiny_llama(), files["a"])
    with torch.no_grad():
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager")
        compiled(ids())
        graphs = _graphs()
        model.model.layers[0].self_attn.q_proj.adapters["default"].scaling = 0.5
        compiled(ids())
    assert _graphs() > graphs
    with pytest.raises(ConfigError, match="prepare_for_hotswap"):
        hotswap_adapter(model, files["b"])


def test_swaps_that_do_not_fit_are_refused_and_change_nothing(files, tmp_path):
    model = load_adapter(tiny_llama(), files["a"])
    prepare_for_hotswap(model, rank=4)
    before = {n: p.clone() for n, p in model.named_parameters() if ".adapters." in n}
    with pytest.raises(AdapterFileError, match="above the prepared 4"):
        hotswap_adapter(model, files["b"])
    other = tiny_llama()
    inject(other, LoraConfig(r=2, alpha=2, targets=("q", "k")))
    with pytest.raises(AdapterFileError, match="other modules"):
        hotswap_adapter(model, save_adapter(other, tmp_path / "qk"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".adapters." in n)
    with pytest.raises(ConfigError, match="above the hot-swap rank"):
        prepare_for_hotswap(load_adapter(tiny_llama(), files["b"]), rank=4)

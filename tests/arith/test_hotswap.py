"""Hot-swap (lorakit.arith.hotswap): adapters of other ranks and alphas swap into a compiled model without a
recompilation (torch._dynamo counters), with outputs equal to loading each adapter afresh.

Fast tests compile a two-layer MLP; the slow one compiles a whole (tiny) Llama, whose tracing is slow."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lorakit import LoraConfig, inject, load_adapter, read_adapter, save_adapter
from lorakit.arith.hotswap import hotswap_adapter, prepare_for_hotswap
from lorakit.errors import AdapterFileError, ConfigError
from tiny import ids, randomize_lora, tiny_llama


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


# (model factory, input, targets, the per-module rank pattern); ranks 4 → 6 (one module 2) → 2 (rsLoRA).
FAMILIES = {
    "mlp": (tiny_mlp, lambda: torch.randn(3, 16, generator=torch.Generator().manual_seed(3)), ("0", "2"), r"^0$"),
    "llama": (tiny_llama, ids, ("q", "v"), r"layers\.0\.self_attn\.q_proj"),
}


def _configs(family: str) -> dict[str, LoraConfig]:
    _, _, targets, pattern = FAMILIES[family]
    return {
        "a": LoraConfig(r=4, alpha=8, targets=targets),
        "b": LoraConfig(r=6, alpha=3, targets=targets, rank_pattern={pattern: 2}),
        "c": LoraConfig(r=2, alpha=5, targets=targets, use_rslora=True),
    }


def _files(family: str, folder) -> dict[str, object]:
    paths = {}
    for i, (name, config) in enumerate(_configs(family).items()):
        model = FAMILIES[family][0]()
        inject(model, config)
        randomize_lora(model, seed=i + 1)
        paths[name] = save_adapter(model, folder / name)
    return paths


def _out(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(FAMILIES[family][1]())
    return getattr(out, "logits", out)


def _fresh(path, family: str) -> torch.Tensor:
    return _out(load_adapter(FAMILIES[family][0](), path), family)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _check_swaps_do_not_recompile(family: str, folder) -> None:
    files = _files(family, folder)
    model = load_adapter(FAMILIES[family][0](), files["a"])
    prepare_for_hotswap(model, rank=8)
    assert torch.allclose(_out(model, family), _fresh(files["a"], family), atol=1e-6)  # padding changes nothing
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(_out(compiled, family), _fresh(files["a"], family), atol=1e-6)
    graphs = _graphs()
    assert graphs >= 1
    for name in ("b", "c", "a"):
        hotswap_adapter(model, files[name])
        assert torch.allclose(_out(compiled, family), _fresh(files[name], family), atol=1e-5), name
        assert not torch.allclose(_out(compiled, family), _out(FAMILIES[family][0](), family), atol=1e-3)
    assert _graphs() == graphs  # three swaps (ranks 6 with a 2, then 2; alphas 3 and 5; rsLoRA): no new graph
    saved = save_adapter(model, folder / "swapped")  # the padded adapter saves as a valid file
    assert read_adapter(saved).config.r == 8
    assert torch.allclose(_fresh(saved, family), _fresh(files["a"], family), atol=1e-5)


def test_swaps_of_other_ranks_and_alphas_do_not_recompile(tmp_path):
    _check_swaps_do_not_recompile("mlp", tmp_path)


@pytest.mark.slow
def test_swaps_do_not_recompile_a_whole_llama(tmp_path):
    _check_swaps_do_not_recompile("llama", tmp_path)


def test_the_counter_sees_a_recompilation_without_preparation(tmp_path):
    """Control: changing what an unprepared layer reads (its scaling float) recompiles."""
    files = _files("mlp", tmp_path)
    model = load_adapter(tiny_mlp(), files["a"])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    _out(compiled, "mlp")
    graphs = _graphs()
    model[0].adapters["default"].scaling = 0.5
    _out(compiled, "mlp")
    assert _graphs() > graphs
    with pytest.raises(ConfigError, match="prepare_for_hotswap"):
        hotswap_adapter(model, files["b"])


def test_swaps_that_do_not_fit_are_refused_and_change_nothing(tmp_path):
    files = _files("mlp", tmp_path)
    model = load_adapter(tiny_mlp(), files["a"])
    prepare_for_hotswap(model, rank=4)
    before = {n: p.clone() for n, p in model.named_parameters() if ".adapters." in n}
    with pytest.raises(AdapterFileError, match="above the prepared 4"):
        hotswap_adapter(model, files["b"])
    other = tiny_mlp()
    inject(other, LoraConfig(r=2, alpha=2, targets=("0",)))
    with pytest.raises(AdapterFileError, match="other modules"):
        hotswap_adapter(model, save_adapter(other, tmp_path / "only0"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".adapters." in n)
    with pytest.raises(ConfigError, match="above the hot-swap rank"):
        prepare_for_hotswap(load_adapter(tiny_mlp(), files["b"]), rank=4)

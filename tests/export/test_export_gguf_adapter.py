"""``lorakit export --format gguf-adapter``: the file, read back with gguf's reader and applied the way
llama.cpp applies it (alpha / rank, q/k rows permuted), gives lorakit's own ΔW on real SmolLM2."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from transformers import AutoConfig

from export_util import lorakit_delta_w, make_adapter
from lorakit.cli import main
from lorakit.export.gguf_adapter import read_delta_w
from lorakit.export.llama_cpp_names import gguf_name, layout_of, unpermute_rows
from lorakit.io.models import builtin_gguf

CASES = {
    "plain": dict(r=8, alpha=16.0, targets=("q", "k", "v", "o", "ffn")),
    "rslora": dict(r=8, alpha=16.0, targets=("q", "k", "v"), use_rslora=True),
    "rank_pattern": dict(r=4, alpha=8.0, targets=("q", "k", "v", "o"), rank_pattern={"k_proj": 16},
                         alpha_pattern={r"layers\.1\.self_attn\.o_proj": 3.0}),
}


def _llama_cpp_delta_w(path, layout) -> dict[str, np.ndarray]:
    """ΔW as llama.cpp applies the file, mapped back to transformers' module names and row order."""
    by_gguf = {k.removesuffix(".weight"): v for k, v in read_delta_w(path).items()}
    out = {}
    for i in range(layout.n_layers):
        for module in (f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            out[module] = by_gguf.get(gguf_name(layout, module))
        for module in (f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")):
            out[module] = by_gguf.get(gguf_name(layout, module))
    for module, dw in out.items():
        if dw is not None and module.endswith(("q_proj", "k_proj")):
            out[module] = unpermute_rows(dw, layout.n_head if module.endswith("q_proj") else layout.n_kv_head)
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_applies_lorakits_delta_w(smollm2_path, tmp_path, case, capsys):
    adapter = make_adapter(tmp_path / "adapter", **CASES[case])
    out = tmp_path / "adapter.gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-adapter", "--out", str(out)]) == 0
    assert "llama-server -m" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    layout = layout_of(AutoConfig.from_pretrained(smollm2_path))
    _check_llama_cpp_shapes(reader)
    theirs = _llama_cpp_delta_w(out, layout)
    ours = lorakit_delta_w(adapter)
    assert set(theirs) == set(ours) and ours
    for module, dw in ours.items():
        np.testing.assert_allclose(theirs[module], dw, rtol=0, atol=1e-6 * max(1.0, np.abs(dw).max()),
                                   err_msg=module)


def _check_llama_cpp_shapes(reader: gguf.GGUFReader) -> None:
    """llama-adapter.cpp's rule, in ne order: base ne0 == a ne0, base ne1 == b ne1, a ne1 == b ne0 (the rank)."""
    base = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(builtin_gguf("smollm2-135m")).tensors}
    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert tensors
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            b, w = tensors[name[:-1] + "b"], base[name[: -len(".lora_a")]]
            assert (w[0], w[1], a[1]) == (a[0], b[1], b[0]), name

"""Loading a base quantized layer by layer (lorakit.quant.load): equal to load-then-quantize, strict files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LorakitError
from lorakit.io.models import load_model
from lorakit.quant.linear import QuantizedLinear, quantize_base
from lorakit.quant.load import copy_from_file, load_quantized, weight_files
from lorakit.training.config import TrainConfig
from lorakit.training.defaults import resolve_task_defaults
from tiny import make_tiny_llama


def _tied_tiny_llama(path):
    """make_tiny_llama's model with the output head tied to the input embedding (as SmolLM2 is)."""
    folder = make_tiny_llama(path)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    weights.pop("lm_head.weight", None)  # a tied checkpoint stores the embedding once
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_load_equals_load_then_quantize(tmp_path, scheme, tied):
    folder = (_tied_tiny_llama if tied else make_tiny_llama)(tmp_path / "tiny")
    ours, tok, report = load_quantized(str(folder), scheme)
    ref, _ = load_model(str(folder))
    ref_report = quantize_base(ref, scheme)
    assert report.layers == ref_report.layers and len(report.layers) == 14  # 7 linears x 2 blocks, head dense
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(ours_state[key], value), key  # every packed code, scale and dense weight
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert ours.config.pad_token_id == tok.pad_token_id and not ours.training
    x = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref.eval()(x).logits, atol=0, rtol=0)


def test_streamed_load_refuses_what_it_cannot_do(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    with pytest.raises(LorakitError, match=r"loads 'causal-lm' or 'base' models, not 'seq-cls'"):
        load_quantized(str(folder), "nf4", "seq-cls")
    weights = load_file(folder / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorakitError, match=r"the checkpoint lacks model\.norm\.weight"):
        load_quantized(str(folder), "nf4")
    weights["model.norm.weight"] = torch.ones(1)  # would broadcast into the (32,) norm weight
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorakitError, match=r"model\.norm\.weight has shape \(1,\), the model expects \(32,\)"):
        load_quantized(str(folder), "nf4")
    weights["model.norm.weight"] = torch.ones(32)
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorakitError, match=r"q_proj\.weight has shape \(16, 32\), the model expects \(32, 32\)"):
        load_quantized(str(folder), "nf4")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # never unpickled
    with pytest.raises(LorakitError, match=r"holds no model\.safetensors or model\.safetensors\.index\.json"):
        weight_files(folder)


def test_chunked_copy_is_exact_for_big_and_scalar_tensors(tmp_path, monkeypatch):
    import lorakit.quant.load

    monkeypatch.setattr(lorakit.quant.load, "CHUNK_BYTES", 3 * 16 * 4)  # three rows of 16 floats per slice
    big, scalar = torch.randn(10, 16), torch.tensor(2.5)
    save_file({"big": big, "scalar": scalar}, tmp_path / "w.safetensors")
    out_big, out_scalar = torch.zeros(10, 16), torch.zeros(())
    copy_from_file(tmp_path / "w.safetensors", "big", out_big)
    copy_from_file(tmp_path / "w.safetensors", "scalar", out_scalar)
    assert torch.equal(out_big, big) and torch.equal(out_scalar, scalar)


def test_quantized_training_checkpoints_gradients_unless_told_not_to():
    base = TrainConfig(task="e2e", data="e2e", model="smollm2-135m")
    assert resolve_task_defaults(base, "generation").gradient_checkpointing is False
    quantized = TrainConfig(task="e2e", data="e2e", model="smollm2-135m", quantize="nf4")
    assert resolve_task_defaults(quantized, "generation").gradient_checkpointing is True
    assert resolve_task_defaults(quantized, "generation").return_freed_memory is True
    assert resolve_task_defaults(base, "generation").return_freed_memory is False
    told = TrainConfig(task="e2e", data="e2e", model="smollm2-135m", quantize="nf4", gradient_checkpointing=False,
                       return_freed_memory=False)  # fmt: skip
    resolved = resolve_task_defaults(told, "generation")
    assert resolved.gradient_checkpointing is False and resolved.return_freed_memory is False


def test_trainer_quantizes_while_loading(tmp_path, capfd):
    from lorakit.training.prepare import build_model

    folder = make_tiny_llama(tmp_path / "tiny")
    cfg = TrainConfig(task="e2e", data="e2e", model=str(folder), quantize="int8", targets=("q", "v"))
    spec = type("Spec", (), {"model_task": "causal-lm", "num_labels": None})()
    model, _ = build_model(cfg, spec, {})
    assert "(layer by layer while loading)" in capfd.readouterr().out
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


def test_heap_setting_is_taken_on_glibc():
    import ctypes.util
    import platform

    from lorakit.quant.heap import return_freed_memory_promptly, trim_heap

    trim_heap()  # never raises, glibc or not
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    assert return_freed_memory_promptly() is bool(on_glibc)

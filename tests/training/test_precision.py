"""--base-dtype: the frozen base held in bf16 / fp16 while what trains (LoRA, heads, biases), the optimizer
state and the loss stay fp32; lorakit merge --dtype adds ΔW in fp32 and rounds once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit import ConfigError
from lorakit.training import distributed as dist_util
from lorakit.training.loop import run_loop
from lorakit.training.precision import base_dtype
from lorakit.training.prepare import prepare_run
from lorakit.training.trainer import train
from train_util import base_cfg, write_sentiment_csv


def test_default_dtype_is_fp32_on_cpu_and_bf16_on_cuda():
    assert base_dtype(None, "cpu") == torch.float32 and base_dtype(None, "cuda") == torch.bfloat16
    assert base_dtype("fp16", "cpu") == torch.float16 and base_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ConfigError, match="base_dtype must be one of"):
        base_cfg(task="text", data="d", base_dtype="int4")


def prepared(cfg):
    info = dist_util.setup("cpu")
    return prepare_run(cfg, info, resume=False, overwrite=False, kill_after_step=None)


def e2e_cfg(model, data, out, **kw):
    return base_cfg(model=str(model), task="e2e", data=str(data / "e2e"), out=str(out), max_train_samples=16,
                    max_length=64, max_steps=2, lr=5e-3, **kw)  # fmt: skip


def test_bf16_base_trains_fp32_adapters_and_optimizer_state(tiny_llama, shared_data, tmp_path, one_thread):
    with pytest.warns(UserWarning):  # E2E splits carved from the valid file
        run = prepared(e2e_cfg(tiny_llama, shared_data, tmp_path / "bf16", base_dtype="bf16"))
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    trained = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained
    assert {p.dtype for p in trained.values()} == {torch.float32}
    run_loop(run)
    states = [s for s in run.optimizer.state.values() if s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}
    assert any(p.abs().max() > 0 for n, p in trained.items() if "B" in n)  # B left zero: it trained


def test_bf16_base_loss_stays_close_to_fp32(tiny_llama, shared_data, tmp_path, one_thread):
    losses = {}
    for name in ("fp32", "bf16"):
        with pytest.warns(UserWarning):
            run = prepared(e2e_cfg(tiny_llama, shared_data, tmp_path / name, base_dtype=name))
        run_loop(run)
        losses[name] = [r["loss"] for r in run.log.records() if r["split"] == "train"]
        run.log.close()
    assert len(losses["bf16"]) == 2
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)  # bf16 rounding of the base only


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_bf16_classifier_heads_and_biases_train_in_fp32(tiny_bert, tmp_path, one_thread, method):
    data = write_sentiment_csv(tmp_path / "data", n_train=16, n_test=8)
    out = tmp_path / method
    result = train(base_cfg(model=str(tiny_bert), task="text", data=str(data), out=str(out), method=method,
                            base_dtype="bf16", max_steps=3))  # fmt: skip
    assert 0.0 <= result["accuracy"] <= 1.0
    saved = out / ("adapter_model.safetensors" if method == "lora" else "method_model.safetensors")
    tensors = load_file(saved)
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    assert json.loads((out / "train_config.json").read_text())["base_dtype"] == "bf16"


def test_merge_writes_the_chosen_dtype_with_one_rounding(tiny_llama, shared_data, tmp_path, one_thread):
    from lorakit.cli.merge import merge_main
    from lorakit.io.files import load_adapter
    from lorakit.io.models import load_model

    with pytest.warns(UserWarning):
        train(e2e_cfg(tiny_llama, shared_data, tmp_path / "run", eval_interval=0, max_eval_samples=1,
                      num_beams=1, max_new_tokens=2))  # fmt: skip
    assert merge_main(["--model", str(tiny_llama), "--adapter", str(tmp_path / "run"),
                       "--out", str(tmp_path / "merged"), "--dtype", "bf16"]) == 0  # fmt: skip
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    # W0 in bf16 plus ΔW in fp32, rounded once: the file holds exactly that.
    model, _ = load_model(tiny_llama, dtype=torch.bfloat16)
    load_adapter(model, tmp_path / "run")
    key = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    layer = model.get_submodule(key.removesuffix(".weight"))
    w0, dw = layer.base_layer.weight.detach().clone(), layer.delta_weight("default")
    assert dw.dtype == torch.float32 and dw.abs().max() > 0
    assert torch.equal(merged[key], (w0.float() + dw).to(torch.bfloat16))
    assert not torch.equal(merged[key], w0)  # the adapter changed it

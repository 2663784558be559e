"""The training loop: lr schedule, epochs, gradient checkpointing, bf16, baseline methods and
torch.compile, on tiny random models (data order and micro-batches: test_sampler.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorakit.training import checkpoint as ckpt
from lorakit.training.optim import lr_factor
from lorakit.training.outputs import load_trained, save_trained
from lorakit.training.prepare import prepare_model
from lorakit.training.trainer import train
from train_util import base_cfg, trainable_names, write_sentiment_csv

# -- schedule --------------------------------------------------------------------------------------------


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert lr_factor(2, 10, 2, "linear") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 2, "constant") == 1.0
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)  # the last step still learns




# -- the loop on tiny models ----------------------------------------------------------------------------


def test_each_epoch_sees_every_example_once_in_a_new_order(tiny_bert, tmp_path, one_thread, monkeypatch):
    import lorakit.training.loop as trainer_module

    data = write_sentiment_csv(tmp_path / "data", n_train=24, n_test=4)
    (data / "dev.csv").write_text((data / "test.csv").read_text())  # a valid file: all 24 are trained on
    batches: list[list[str]] = []
    real_collate = trainer_module.collate

    def spy(spec, rows, pad_token_id):
        batches.append([" ".join(map(str, r["input_ids"])) for r in rows])
        return real_collate(spec, rows, pad_token_id)

    monkeypatch.setattr(trainer_module, "collate", spy)
    train(base_cfg(model=str(tiny_bert), task="text", data=str(data), out=str(tmp_path / "o"), max_steps=None,
                   epochs=2))  # fmt: skip
    assert len(batches) == 6  # 24 examples, batch 8, 2 epochs
    first = [text for batch in batches[:3] for text in batch]
    second = [text for batch in batches[3:] for text in batch]
    assert len(set(first)) == len(set(second)) == 24 and set(first) == set(second)
    assert first != second


def test_gradient_checkpointing_gives_the_same_adapter_and_bf16_stays_close(
    tiny_bert, tmp_path, one_thread, monkeypatch
):
    import transformers.modeling_utils as modeling_utils

    recomputed = []
    real_checkpoint = modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    data = write_sentiment_csv(tmp_path / "data", n_train=24, n_test=4)
    common = dict(model=str(tiny_bert), task="text", data=str(data), max_steps=3, lr=5e-3)
    runs = {}
    for name, extra in {
        "plain": {},
        "ckpt": {"gradient_checkpointing": True},
        "bf16": {"bf16": True},
    }.items():
        train(base_cfg(**common, **extra, out=str(tmp_path / name)))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["split"] == "train"]
        runs[name] = (load_file(tmp_path / name / "adapter_model.safetensors"), losses)
        assert (len(recomputed) > 0) == (name == "ckpt"), name  # checkpointed blocks ran only when asked
        recomputed.clear()
    plain, ckpt_run, bf16 = runs["plain"], runs["ckpt"], runs["bf16"]
    assert max((plain[0][k] - ckpt_run[0][k]).abs().max().item() for k in plain[0]) < 1e-6
    assert ckpt_run[1] == pytest.approx(plain[1], abs=1e-6)
    assert all(math.isfinite(v) for v in bf16[1]) and bf16[1] == pytest.approx(plain[1], abs=0.05)
    assert any((plain[0][k] - bf16[0][k]).abs().max() > 0 for k in plain[0])  # autocast did change the math


def test_baselines_train_save_and_load_through_the_trainer(tiny_bert, tmp_path):
    from lorakit.io.models import load_model

    cfg = base_cfg(task="rte", data="d", method="bitfit")
    model, _ = load_model(tiny_bert, "seq-cls", num_labels=2)
    prepare_model(model, cfg)
    names = trainable_names(model)
    assert names and all(n.endswith("bias") or "classifier" in n for n in names)
    with torch.no_grad():
        for _, p in ckpt.trainable_parameters(model):
            p.add_(0.25)
    save_trained(model, tmp_path / "bitfit", cfg)
    fresh, _ = load_model(tiny_bert, "seq-cls", num_labels=2)
    load_trained(fresh, tmp_path / "bitfit")
    ids = torch.tensor([[101, 2023, 2003, 102]])
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    # A LoRA run saved into the same folder replaces the baseline's files: one trained state per folder.
    lora_cfg = base_cfg(task="rte", data="d")
    lora, _ = load_model(tiny_bert, "seq-cls", num_labels=2)
    prepare_model(lora, lora_cfg)
    save_trained(lora, tmp_path / "bitfit", lora_cfg)
    files = sorted(f.name for f in (tmp_path / "bitfit").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]


def test_compiled_training_matches_eager_and_evaluates_eagerly(
    tiny_llama, tmp_path, one_thread, shared_data, monkeypatch
):
    from torch._dynamo.utils import counters

    import lorakit.metrics.nlg

    monkeypatch.setattr(lorakit.metrics.nlg, "nlg_metrics", lambda hyps, refs: {"BLEU": float(len(hyps))})
    common = dict(
        model=str(tiny_llama), task="e2e", data=str(shared_data / "e2e"), max_train_samples=16,
        max_eval_samples=3, num_beams=2, max_new_tokens=8, max_length=64, max_steps=3, lr=5e-3,
    )  # fmt: skip
    runs = {}
    for name in ("eager", "compiled"):
        counters.clear()
        with pytest.warns(UserWarning, match="not the official E2E splits"):
            assert train(base_cfg(**common, compile=name == "compiled", out=str(tmp_path / name))) == {"BLEU": 3.0}
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["split"] == "train"]
        runs[name] = (load_file(tmp_path / name / "adapter_model.safetensors"), losses)
        graphs = counters["stats"]["unique_graphs"]
        # Compiled: the backbone's training forward was captured (a graph or two as shapes vary), and
        # beam search, with a new shape at every step, was not (it would add a graph per length).
        assert (0 < graphs <= 3) if name == "compiled" else graphs == 0, (name, graphs)
    (eager, eager_losses), (compiled, compiled_losses) = runs["eager"], runs["compiled"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-4
    assert any(eager[k].abs().max() > 0 for k in eager if "lora_B" in k)  # B moved off zero: it trained

"""LoRA+ (``loraplus_ratio``): B matrices learn at ratio x the lr of A, from flags, config files and resume."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorakit import ConfigError
from lorakit.cli.common import add_config_arguments
from lorakit.training import checkpoint as ckpt
from lorakit.training import hooks
from lorakit.training.config import resolve_config
from lorakit.training.optim import build_optimizer, lora_b_parameters
from lorakit.training.prepare import prepare_model
from lorakit.training.trainer import train
from tiny import make_tiny_bert
from train_util import base_cfg, write_sentiment_csv


def _lr_by_name(model, optimizer) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def test_b_matrices_get_ratio_times_the_lr_and_nothing_else_moves(tiny_bert):
    from lorakit.io.models import load_model

    model, _ = load_model(tiny_bert, "seq-cls", num_labels=2)
    cfg = base_cfg(task="rte", data="d", lr=1e-3, head_lr_ratio=10.0, loraplus_ratio=16.0)
    prepare_model(model, cfg)
    optimizer = build_optimizer(model, cfg)
    lrs = _lr_by_name(model, optimizer)
    b_ids = {id(p) for p in lora_b_parameters(model)}
    named = dict(model.named_parameters())
    b_names = {n for n in lrs if id(named[n]) in b_ids}
    a_names = {n for n in lrs if ".adapters." in n} - b_names
    assert b_names and a_names and len(b_names) == len(a_names)  # one B per A (q and v, 2 layers)
    assert all(lrs[n] == pytest.approx(16e-3) for n in b_names)
    assert all(lrs[n] == pytest.approx(1e-3) for n in a_names)
    heads = {n for n in lrs if ".copies." in n}
    assert heads and all(lrs[n] == pytest.approx(1e-2) for n in heads)  # head_lr_ratio, not LoRA+
    assert len(lrs) == sum(len(g["params"]) for g in optimizer.param_groups)  # each parameter in one group
    # B matrices are 2-D: they keep their weight decay in their own group.
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay_of[id(named[n])] == cfg.weight_decay for n in b_names)
    # Without LoRA+ the groups are exactly the ones the trainer always built (old checkpoints resume).
    plain = build_optimizer(model, base_cfg(task="rte", data="d", lr=1e-3, head_lr_ratio=10.0))
    assert len(plain.param_groups) == len(optimizer.param_groups) - 1
    plain_lrs = _lr_by_name(model, plain)
    assert all(plain_lrs[n] == pytest.approx(1e-3) for n in b_names | a_names)


def test_same_parameters_get_the_b_lr_as_in_peft(tiny_llama):
    """On a Llama (no biases, no embedding LoRA, so PEFT's quirks do not arise) lorakit's groups give
    ratio x lr to the same parameters as PEFT's create_loraplus_optimizer: compared as (shape, lr) lists."""
    import peft
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.io.models import load_model

    cfg = base_cfg(task="e2e", data="d", lr=1e-3, head_lr_ratio=1.0, loraplus_ratio=16.0, targets=["q", "v"])
    mine, _ = load_model(tiny_llama, "causal-lm")
    prepare_model(mine, cfg)
    lrs = _lr_by_name(mine, build_optimizer(mine, cfg))
    ours = sorted((tuple(p.shape), round(lrs[n], 9)) for n, p in mine.named_parameters() if p.requires_grad)
    base, _ = load_model(tiny_llama, "causal-lm")
    theirs_model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    theirs = sorted((tuple(p.shape), round(g["lr"], 9)) for g in optimizer.param_groups for p in g["params"])
    assert ours == theirs and {lr for _, lr in ours} == {1e-3, 16e-3}


def test_flag_config_file_and_checks(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = vars(parser.parse_args(["--task", "rte", "--data", "d", "--loraplus-ratio", "16"]))
    assert resolve_config(None, flags).loraplus_ratio == 16.0
    path = tmp_path / "run.toml"
    path.write_text('task = "rte"\ndata = "d"\nloraplus_ratio = 8\n')
    assert resolve_config(path, {}).loraplus_ratio == 8.0
    assert resolve_config(path, {"loraplus_ratio": "4"}).loraplus_ratio == 4.0
    with pytest.raises(ConfigError, match="loraplus_ratio must be a positive number"):
        base_cfg(task="rte", data="d", loraplus_ratio=0.0)
    with pytest.raises(ConfigError, match="loraplus_ratio applies to LoRA's B matrices; method 'full'"):
        base_cfg(task="rte", data="d", method="full", loraplus_ratio=16.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loraplus")
    model = make_tiny_bert(root / "tiny-bert-dropout", dropout=0.1)
    data = write_sentiment_csv(root / "data", n_train=40, n_test=8)
    return root, model, data


def _cfg(model, data, out, **kw):
    return base_cfg(
        model=str(model), task="text", data=str(data), out=str(out), max_steps=8, save_interval=3,
        eval_interval=0, dropout=0.1, lr=2e-3, keep_checkpoints=0, **kw,
    )  # fmt: skip


def test_loraplus_trains_and_an_interrupted_run_resumes_to_the_same_adapter(setup, one_thread, monkeypatch):
    root, model, data = setup
    reference = train(_cfg(model, data, root / "reference", loraplus_ratio=16.0))
    plain = train(_cfg(model, data, root / "plain"))
    ref = load_file(root / "reference" / "adapter_model.safetensors")
    other = load_file(root / "plain" / "adapter_model.safetensors")
    b_keys = [k for k in ref if "lora_B" in k]
    assert b_keys and all(torch.isfinite(ref[k]).all() for k in ref)
    # B learned faster: its matrices moved further from their zero start than with one lr for both.
    assert sum(ref[k].norm() for k in b_keys) > 2 * sum(other[k].norm() for k in b_keys)
    assert set(plain) == set(reference)

    class Interrupted(Exception):
        pass

    real = hooks.save_checkpoint

    def save_then_stop(run):
        real(run)
        if run.state.step == 6:
            raise Interrupted

    monkeypatch.setattr(hooks, "save_checkpoint", save_then_stop)
    cfg = _cfg(model, data, root / "resumed", loraplus_ratio=16.0)
    with pytest.raises(Interrupted):
        train(cfg)
    monkeypatch.setattr(hooks, "save_checkpoint", real)
    assert [s for s, _ in ckpt.list_checkpoints(root / "resumed")] == [3, 6]
    resumed = train(cfg, resume=True)
    assert resumed == pytest.approx(reference, abs=1e-6)
    got = load_file(root / "resumed" / "adapter_model.safetensors")
    for key in ref:
        assert (ref[key] - got[key]).abs().max().item() <= 1e-6, key
    shutil.rmtree(root / "plain")

"""Checkpoints: optimizer, scheduler and RNG state round-trip; incomplete checkpoints ignored and pruned."""

from __future__ import annotations

import torch

from lorakit.training import checkpoint as ckpt
from lorakit.training.optim import build_optimizer, lr_factor
from lorakit.training.outputs import save_trained
from lorakit.training.prepare import prepare_model
from train_util import base_cfg

# -- checkpoints -----------------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_optimizer_scheduler_and_rng(tiny_bert, tmp_path):
    from lorakit.io.models import load_model

    cfg = base_cfg(task="rte", data="d", dropout=0.1, lr=1e-3, head_lr_ratio=10.0)

    def setup():
        torch.manual_seed(0)
        model, _ = load_model(tiny_bert, "seq-cls", num_labels=2)
        prepare_model(model, cfg)
        opt = build_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 2, "linear"))
        return model, opt, sched

    def step(model, opt, sched):
        model.train()
        out = model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 102]])).logits.sum()
        out.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    model, opt, sched = setup()
    for _ in range(2):
        step(model, opt, sched)
    path = ckpt.save_checkpoint(
        tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state={"step": 2, "epoch": 0},
        rng_states=[ckpt.capture_rng()], save_trained=lambda m, p: save_trained(m, p, cfg),
    )  # fmt: skip
    assert (path / "adapter_config.json").is_file()  # a checkpoint is also a usable adapter
    step(model, opt, sched)
    expected = {n: p.detach().clone() for n, p in ckpt.trainable_parameters(model)}

    model2, opt2, sched2 = setup()
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 2, "epoch": 0}
    assert sched2.last_epoch == 2
    step(model2, opt2, sched2)  # same dropout mask, same Adam moments → same parameters
    for name, p in ckpt.trainable_parameters(model2):
        torch.testing.assert_close(p, expected[name], rtol=0, atol=0)


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-2", "step-10", "step-5"):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.STATE_JSON).write_text("{}")
        (root / name / ckpt.STATE_TENSORS).write_bytes(b"")
    (root / "step-12").mkdir()  # killed before its state was written: not complete
    (root / ".step-14.tmp-abc").mkdir()  # leftover of an interrupted save
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-10"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 10]
    assert not (root / ".step-14.tmp-abc").exists()

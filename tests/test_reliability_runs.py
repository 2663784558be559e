"""Issue 15, the run side: diverging training, run folders that must not lose an adapter, and a kill -9
in every window of a save (adapter pair, checkpoint)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import ConfigError, LoraConfig, inject, load_adapter, read_adapter, save_adapter
from lorakit.cli import main
from lorakit.errors import TrainingDivergedError
from lorakit.io.fsutil import KILL_ENV
from lorakit.training import checkpoint as ckpt
from lorakit.training import loop as trainer
from lorakit.training.metrics_log import MetricsLog
from lorakit.training.trainer import train
from tiny import make_tiny_bert, randomize_lora, tiny_llama
from train_util import base_cfg, write_sentiment_csv

PAIR_WINDOWS = ["pair:weights-written", "pair:config-written", "pair:weights-renamed", "pair:config-renamed"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return make_tiny_bert(root / "tiny-bert"), write_sentiment_csv(root / "data", n_train=40, n_test=8)


def _cfg(setup, out: Path, **kw):
    model, data = setup
    return base_cfg(model=str(model), task="text", data=str(data), out=str(out), **kw)


def _killed_during(point: str, fn) -> None:
    """Run ``fn`` in a forked child that the test hook SIGKILLs at ``point``, as a crash would."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.environ[KILL_ENV] = point
            fn()
        finally:
            os._exit(17)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:  # never hang the suite on a stuck child
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{point}: the forked save did not finish")
        time.sleep(0.01)
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point}: not killed ({status})"


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# == 3. non-finite options and losses =====================================================================
@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--weight-decay", "nan"), ("--epochs", "inf"),
                                         ("--label-smoothing", "nan"), ("--clip-norm", "nan")])  # fmt: skip
def test_non_finite_float_options_are_config_errors(tmp_path, capsys, flag, value):
    rc = main(["train", "--task", "text", "--data", str(tmp_path), "--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    name = flag[2:].replace("-", "_")
    assert rc == 1 and err == f"lorakit train: error: {name} must be a finite number, got {float(value)!r}\n"


def _diverge_from_call(monkeypatch, n: int) -> None:
    """The loss of every micro-batch from call ``n`` on is NaN, as after a blown-up update."""
    real, calls = trainer.loss_sum, [0]

    def loss_sum(*args, **kwargs):
        calls[0] += 1
        summed = real(*args, **kwargs)
        return summed * float("nan") if calls[0] >= n else summed

    monkeypatch.setattr(trainer, "loss_sum", loss_sum)


def test_a_diverging_run_stops_keeps_the_old_adapter_and_its_last_checkpoint(setup, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    train(_cfg(setup, out, max_steps=2))
    before = _snapshot(out)
    old_adapter = {k: before[k] for k in ("adapter_config.json", "adapter_model.safetensors")}
    # --overwrite, then the loss turns NaN at step 4, after the checkpoint of step 2.
    _diverge_from_call(monkeypatch, 4)
    with pytest.raises(TrainingDivergedError, match=r"step 4: the training loss is nan.*step-2"):
        train(_cfg(setup, out, max_steps=6, save_interval=2), overwrite=True)
    after = _snapshot(out)
    assert {k: after[k] for k in old_adapter} == old_adapter  # the old adapter is still there, whole
    assert "eval_results.json" not in after
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert read_adapter(ckpt.latest_checkpoint(out)).pairs  # the last good checkpoint loads
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON, finite losses only
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_run_files_share_one_mode(setup, tmp_path, one_thread):
    out = tmp_path / "run"
    train(_cfg(setup, out, max_steps=2, save_interval=1))
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_metrics_log_is_strict_json(tmp_path):
    log = MetricsLog(tmp_path, enabled=True, trackers=[])
    log.write({"split": "valid", "step": 1, "matthews": math.nan, "loss": math.inf, "accuracy": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert record == {"split": "valid", "step": 1, "matthews": None, "loss": None, "accuracy": 0.5}


# == 4. run folders ========================================================================================
def test_a_folder_holding_only_an_adapter_needs_overwrite(setup, tmp_path, no_model_loading):
    out = tmp_path / "ad"
    model = tiny_llama()
    inject(model, LoraConfig(targets=("q",)))
    save_adapter(model, out)
    with pytest.raises(ConfigError, match=r"already holds a trained adapter.*--overwrite"):
        train(_cfg(setup, out))


def test_a_run_that_failed_before_its_first_step_does_not_block_its_folder(setup, tmp_path, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text("{}")  # what a run that died loading its model leaves
    with pytest.raises(AssertionError, match="a model was loaded"):  # accepted: it went on to the model
        train(_cfg(setup, out))


def test_resume_accepts_the_same_folder_spelled_differently(setup, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    first = train(_cfg(setup, Path("runs/x"), max_steps=2))
    for spelling in ("./runs/x", str(tmp_path / "runs" / "x"), "runs/../runs/x"):
        assert train(_cfg(setup, Path(spelling), max_steps=2), resume=True) == first
    with pytest.raises(ConfigError, match="different settings"):
        train(_cfg(setup, Path("runs/x"), max_steps=3), resume=True)


# == 4. a kill -9 in every window of a save ================================================================
def _adapter_model(seed: int):
    model = tiny_llama()
    inject(model, LoraConfig(targets=("q", "v")))
    randomize_lora(model, seed=seed)
    return model


@pytest.mark.parametrize("window", PAIR_WINDOWS)
def test_a_kill_in_any_window_of_an_adapter_save_leaves_one_complete_generation(tmp_path, window):
    path = tmp_path / "ad"
    old, new = _adapter_model(1), _adapter_model(2)
    save_adapter(old, path)
    old_tensors = load_file(path / "adapter_model.safetensors")
    save_adapter(new, tmp_path / "new")
    new_tensors = load_file(tmp_path / "new" / "adapter_model.safetensors")
    _killed_during(window, lambda: save_adapter(new, path))
    # Whatever the window, the folder reads as exactly one complete generation, checksum and all.
    parsed = read_adapter(path)
    got = {f"base_model.model.{m}.lora_{w}.weight": t for m, s in parsed.pairs.items() for a_b in s.values()
           for w, t in zip("AB", a_b)}  # fmt: skip
    expected = new_tensors if PAIR_WINDOWS.index(window) >= 2 else old_tensors
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    load_adapter(tiny_llama(), path)
    # The next save finishes or discards what the killed one left: no temporary files remain.
    save_adapter(old, path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    final = load_file(path / "adapter_model.safetensors")
    assert all(torch.equal(final[k], old_tensors[k]) for k in old_tensors)


@pytest.mark.parametrize("window", ["checkpoint:built", "checkpoint:renamed", *PAIR_WINDOWS])
def test_a_kill_in_any_window_of_a_checkpoint_save_keeps_a_loadable_checkpoint(tmp_path, window):
    models = {seed: _adapter_model(seed) for seed in (1, 2)}  # built here: the forked child only saves

    def save(seed: int) -> None:
        model = models[seed]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 3},
                             rng_states=[ckpt.capture_rng()], save_trained=lambda m, p: save_adapter(m, p))  # fmt: skip

    save(1)
    _killed_during(window, lambda: save(2))  # a rerun of the same step, killed
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step-3"
    read_adapter(latest)
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-3"]

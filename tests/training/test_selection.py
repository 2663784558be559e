"""Keep the best validation's adapter and stop when validation stops improving: in one process, across a
real SIGKILL and --resume, and under torchrun (rank 0 decides, both ranks stop together)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import ConfigError
from lorakit.training import checkpoint as ckpt
from lorakit.training.selection import BEST_TENSORS, best_dir, gain
from lorakit.training.trainer import train
from tiny import make_tiny_bert
from train_util import base_cfg, write_sentiment_csv

REPO = Path(__file__).resolve().parents[1]
# An improvement of 2 in accuracy is impossible: only the first validation becomes the best, so the step
# at which patience runs out is known whatever the trajectory.
NEVER = "2.0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    model = make_tiny_bert(root / "tiny-bert-dropout", dropout=0.1)
    data = write_sentiment_csv(root / "data", n_train=40, n_test=8)
    return root, model, data


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def published(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 0.0) -> bool:
    return sorted(a) == sorted(b) and all((a[k] - b[k]).abs().max().item() <= tol for k in a)


def cfg_for(model: Path, data: Path, out: Path, **kw):
    settings = dict(max_steps=12, eval_interval=2, lr=2e-3, dropout=0.1, keep_checkpoints=0)
    return base_cfg(model=str(model), task="text", data=str(data), out=str(out), **{**settings, **kw})


def test_best_is_published_and_last_differs(setup, one_thread):
    root, model, data = setup
    train(cfg_for(model, data, root / "best", keep="best", early_stopping_delta=float(NEVER)))
    train(cfg_for(model, data, root / "last", keep="last", early_stopping_delta=float(NEVER)))
    (select,) = [r for r in records(root / "best") if r["split"] == "select"]
    assert select["step"] == 2 and select["last_step"] == 12 and select["keep"] == "best"
    assert "step 2 of 12" in select["reason"] and not select["stopped_early"]
    best_state = load_file(best_dir(root / "best") / BEST_TENSORS)
    adapter = published(root / "best")
    # The published adapter is step 2's: the trainable tensors saved at that validation.
    assert same_tensors(adapter, published(best_dir(root / "best")))
    assert best_state and all(t.dtype == torch.float32 for t in best_state.values())
    assert not same_tensors(adapter, published(root / "last"), tol=1e-4)  # the last step trained on
    last_select = next(r for r in records(root / "last") if r["split"] == "select")
    assert last_select["step"] == 12 and last_select["keep"] == "last"
    assert [r["step"] for r in records(root / "best") if r["split"] == "eval"] == [2]


def test_selected_step_is_the_best_validation(setup, one_thread):
    root, model, data = setup
    out = root / "select"
    train(cfg_for(model, data, out, select_metric="macro_f1", lr=5e-3, keep="best"))
    valid = [r for r in records(out) if r["split"] == "valid"]
    best = max(valid, key=lambda r: (r["macro_f1"], -r["step"]))  # the first of equal scores
    (select,) = [r for r in records(out) if r["split"] == "select"]
    assert select["metric"] == "macro_f1" and select["step"] == best["step"]
    assert select["value"] == pytest.approx(best["macro_f1"])


def test_patience_stops_the_run_and_says_why(setup, one_thread):
    root, model, data = setup
    out = root / "stopped"
    train(cfg_for(model, data, out, early_stopping_patience=3, early_stopping_delta=float(NEVER), keep="best"))
    log = records(out)
    assert max(r["step"] for r in log if r["split"] == "train") == 8  # validations 2 (best), 4, 6, 8: stop
    (select,) = [r for r in log if r["split"] == "select"]
    assert select["stopped_early"] and select["step"] == 2 and select["last_step"] == 8
    assert "stopped early at step 8: 3 validation(s) without an improvement" in select["reason"]


def test_default_keeps_best_only_when_validation_is_not_the_scored_split(setup, one_thread):
    root, model, data = setup
    # This folder has no valid file: validation examples are the test examples, so the default is last.
    train(cfg_for(model, data, root / "default", max_steps=4, early_stopping_delta=float(NEVER)))
    (select,) = [r for r in records(root / "default") if r["split"] == "select"]
    assert select["keep"] == "last" and select["step"] == 4
    header, *rows = (data / "train.csv").read_text().splitlines()
    # A split of its own: training rows 8 on (the 8 test sentences repeat training rows 0-7).
    (data / "valid.csv").write_text("\n".join([header, *rows[8:]]) + "\n")
    try:
        train(cfg_for(model, data, root / "own-valid", max_steps=4, early_stopping_delta=float(NEVER)))
    finally:
        (data / "valid.csv").unlink()
    (select,) = [r for r in records(root / "own-valid") if r["split"] == "select"]
    assert select["keep"] == "best" and select["step"] == 2


def test_gain_direction_and_missing_values():
    assert gain("loss", 1.0, 2.0) == 1.0 and gain("accuracy", 0.7, 0.5) == pytest.approx(0.2)
    assert gain("accuracy", float("nan"), 0.5) < 0 and gain("loss", 3.0, None) > 0


@pytest.mark.parametrize(
    "override, message",
    [({"keep": "first"}, "keep must be one of"), ({"early_stopping_patience": -1}, "early_stopping_patience"),
     ({"keep": "best", "fsdp": True}, "keep best is not supported with fsdp")],
)  # fmt: skip
def test_bad_selection_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        base_cfg(task="text", data="d", **override)


def cli(cfg, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lorakit", "train", "--model", cfg.model, "--task", "text", "--data", cfg.data,
        "--out", cfg.out, "--max-steps", str(cfg.max_steps), "--eval-interval", "2", "--lr", str(cfg.lr),
        "--dropout", "0.1", "--keep-checkpoints", "0", "--batch-size", "8", "--eval-batch-size", "16",
        "--max-length", "32", "--log-interval", "1", "--no-plot", "--early-stopping-patience", "3",
        "--early-stopping-delta", NEVER, "--keep", "best", *extra,
    ]  # fmt: skip


def test_sigkill_then_resume_keeps_best_and_patience(setup, one_thread):
    root, model, data = setup
    stop = dict(early_stopping_patience=3, early_stopping_delta=float(NEVER), keep="best")
    reference = train(cfg_for(model, data, root / "reference", **stop))
    killed = cfg_for(model, data, root / "killed", save_interval=3, **stop)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Checkpoint 6 holds best step 2 and two validations without improvement; the kill loses step 7.
    proc = subprocess.run([*cli(killed, "--save-interval", "3"), "--debug-kill-after-step", "7"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(root / "killed")] == [3, 6]
    resumed = subprocess.run([*cli(killed, "--save-interval", "3"), "--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # The command's last line says which step was published and why.
    assert resumed.stdout.strip().splitlines()[-1].startswith("published the adapter of step 2 of 8")
    assert json.loads((root / "killed" / "eval_results.json").read_text()) == pytest.approx(reference, abs=1e-6)
    assert same_tensors(published(root / "killed"), published(root / "reference"), tol=1e-6)
    (select,) = [r for r in records(root / "killed") if r["split"] == "select"]
    assert select["last_step"] == 8 and select["step"] == 2


def test_torchrun_ranks_stop_together_like_one_process(setup, one_thread):
    root, _, data = setup
    plain = make_tiny_bert(root / "tiny-bert")  # no dropout: two processes draw different masks
    stop = dict(early_stopping_patience=3, early_stopping_delta=float(NEVER), dropout=0.0, keep="best")
    single = train(cfg_for(plain, data, root / "single", **stop))
    out = root / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    args = cli(cfg_for(plain, data, out, **stop))[3:]  # after "-m lorakit"
    args[args.index("--dropout") + 1] = "0.0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lorakit", *args, "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    assert json.loads((out / "eval_results.json").read_text()) == pytest.approx(single, abs=1e-6)
    # Two ranks sum gradients in another order; Adam's normalisation carries those last bits into the weights.
    assert same_tensors(published(out), published(root / "single"), tol=1e-4)
    assert max(r["step"] for r in records(out) if r["split"] == "train") == 8
    chosen = [[r["step"] for r in records(folder) if r["split"] == "select"] for folder in (out, root / "single")]
    assert chosen == [[2], [2]]

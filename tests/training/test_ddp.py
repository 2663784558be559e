"""Data parallelism keeps the optimisation of the global batch: 2 gloo processes (torchrun) and gradient
accumulation both give the adapter a single process gets with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.training.trainer import train
from tiny import make_tiny_bert
from train_util import base_cfg, write_sentiment_csv

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # No dropout anywhere: each process draws its own masks, so only a dropout-free run can match exactly.
    model = make_tiny_bert(root / "tiny-bert")
    # 36 examples with global batch 8: four full batches and a 4-example tail, split 2 + 2.
    data = write_sentiment_csv(root / "data", n_train=36, n_test=8)
    (data / "dev.csv").write_text((data / "test.csv").read_text())  # a valid file: all 36 are trained on
    return root, model, data


def run_config(model: Path, data: Path, out: Path, **kw):
    settings = dict(max_steps=None, epochs=2, lr=2e-3, log_interval=1)
    return base_cfg(model=str(model), task="text", data=str(data), out=str(out), **{**settings, **kw})


def adapter_gap(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_two_gloo_processes_match_one_process(setup, one_thread):
    root, model, data = setup
    single = train(run_config(model, data, root / "single"))
    out = root / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lorakit", "train", "--model", str(model), "--task", "text", "--data", str(data),
        "--out", str(out), "--epochs", "2", "--lr", "2e-3", "--batch-size", "8", "--eval-batch-size", "16",
        "--max-length", "32", "--log-interval", "1", "--no-plot", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 = 2 process(es) x 4" in proc.stderr
    assert proc.stdout.count("results") == 1  # only rank 0 prints
    assert json.loads((out / "eval_results.json").read_text()) == pytest.approx(single, abs=1e-6)
    assert adapter_gap(root / "single", out) < 1e-5
    assert losses(out) == pytest.approx(losses(root / "single"), abs=1e-5)
    assert len(losses(out)) == 10  # 5 steps per epoch: the 4-example tail is trained on, not dropped


def test_gradient_accumulation_matches_one_big_batch(setup, one_thread):
    root, model, data = setup
    # The head at 1x lr: at the default 10x (lr 2e-2), Adam's first steps turn float rounding in near-zero
    # pooler gradients into ~3e-5 differences, which says nothing about how the gradients are accumulated.
    same = dict(max_steps=3, epochs=1.0, head_lr_ratio=1.0)
    train(run_config(model, data, root / "big", **same))
    train(run_config(model, data, root / "accum", grad_accum=4, **same))
    assert adapter_gap(root / "big", root / "accum") < 1e-6
    assert losses(root / "accum") == pytest.approx(losses(root / "big"), abs=1e-6)


@pytest.mark.slow
def test_fsdp_over_two_gloo_processes_matches_one_process(setup, one_thread):
    root, model, data = setup
    if not (root / "single" / "adapter_model.safetensors").is_file():
        train(run_config(model, data, root / "single"))
    out = root / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lorakit", "train", "--model", str(model), "--task", "text", "--data", str(data),
        "--out", str(out), "--epochs", "2", "--lr", "2e-3", "--batch-size", "8", "--eval-batch-size", "16",
        "--max-length", "32", "--log-interval", "1", "--no-plot", "--device", "cpu", "--fsdp",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert adapter_gap(root / "single", out) < 1e-5  # FSDP saves a plain, unsharded adapter
    assert losses(out) == pytest.approx(losses(root / "single"), abs=1e-5)

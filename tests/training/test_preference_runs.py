"""A DPO run survives what any other run does: SIGKILL then --resume, two gloo processes, a quantized base."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.training.trainer import train
from train_util import base_cfg, train_records

REPO = Path(__file__).resolve().parents[2]
PAIRS = [{"prompt": f"Colour {i}?", "chosen": " red", "rejected": " blue"} for i in range(16)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _data(root: Path) -> Path:
    folder = root / "pref"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    valid = [{"prompt": "Colour 99?", "chosen": " red", "rejected": " blue"}] * 4
    (folder / "valid.jsonl").write_text("".join(json.dumps(p) + "\n" for p in valid))
    return folder


def _flags(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--task", "dpo", "--data", str(data), "--out", str(out), "--max-length", "32",
            "--batch-size", "4", "--lr", "5e-2", "--warmup-steps", "0", "--log-interval", "1", "--no-plot",
            "--dropout", "0", "--device", "cpu"]  # fmt: skip


def _cfg(model: Path, data: Path, out: Path, **kw):
    settings = dict(max_length=32, batch_size=4, lr=5e-2, warmup_steps=0, log_interval=1, dropout=0.0)
    return base_cfg(model=str(model), task="dpo", data=str(data), out=str(out), **{**settings, **kw})


def _gap(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_dpo_killed_and_resumed_matches_an_uninterrupted_run(tiny_llama, tmp_path, one_thread):
    data = _data(tmp_path)
    reference = train(_cfg(tiny_llama, data, tmp_path / "reference", max_steps=8, save_interval=3))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lorakit", "train", *_flags(tiny_llama, data, out), "--max-steps", "8",
           "--save-interval", "3", "--debug-kill-after-step", "5"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "adapter_model.safetensors").exists()
    resumed = train(_cfg(tiny_llama, data, out, max_steps=8, save_interval=3), resume=True)
    assert resumed == pytest.approx(reference, abs=1e-6)
    assert _gap(tmp_path / "reference", out) <= 1e-6
    ref_log, res_log = train_records(tmp_path / "reference"), train_records(out)
    assert [(r["split"], r["step"]) for r in res_log] == [(r["split"], r["step"]) for r in ref_log]
    assert ref_log[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_over_two_gloo_processes_matches_one_process(tiny_llama, tmp_path, one_thread):
    data = _data(tmp_path)
    single = train(_cfg(tiny_llama, data, tmp_path / "single", max_steps=4))
    out = tmp_path / "ddp"
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit",
           "train", *_flags(tiny_llama, data, out), "--max-steps", "4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 2" in proc.stderr
    assert json.loads((out / "eval_results.json").read_text()) == pytest.approx(single, abs=1e-5)
    assert _gap(tmp_path / "single", out) < 1e-5


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_dpo_on_a_quantized_base_starts_at_ln2_and_learns(tiny_llama, tmp_path, one_thread, quantize):
    out = tmp_path / "run"
    result = train(_cfg(tiny_llama, _data(tmp_path), out, max_steps=6, quantize=quantize))
    lines = [r for r in train_records(out) if r["split"] == "train"]
    assert lines[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the reference is the same quantized base
    assert lines[-1]["loss"] < lines[0]["loss"] and result["reward_accuracy"] == 1.0

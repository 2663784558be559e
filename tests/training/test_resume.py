"""--resume after a real SIGKILL mid-epoch ends with the same adapter and metrics as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit import ConfigError
from lorakit.training import checkpoint as ckpt
from lorakit.training.trainer import train
from tiny import make_tiny_bert
from train_util import cli_args, run_config, train_records, write_sentiment_csv

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # Dropout in the base model and in LoRA: the resumed run must also continue the same random stream.
    model = make_tiny_bert(root / "tiny-bert-dropout", dropout=0.1)
    data = write_sentiment_csv(root / "data", n_train=40, n_test=8)
    return root, model, data


def test_sigkill_then_resume_matches_an_uninterrupted_run(setup, one_thread):
    root, model, data = setup
    reference = train(run_config(model, data, root / "reference"))

    killed = run_config(model, data, root / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *cli_args(killed), "--debug-kill-after-step", "7"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = root / "killed"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]
    assert not (out / "eval_results.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert max(r["step"] for r in train_records(out)) == 7  # work after the last checkpoint, to be redone

    resumed = train(killed, resume=True)

    assert resumed == pytest.approx(reference, abs=1e-6)
    a = load_file(root / "reference" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and any("classifier" in k for k in a)
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # the adapters did train
    ref_log, res_log = train_records(root / "reference"), train_records(out)
    assert [(r["split"], r["step"]) for r in res_log] == [(r["split"], r["step"]) for r in ref_log]
    for r, s in zip(ref_log, res_log):
        assert s == pytest.approx(r, abs=1e-6)


def test_resume_refuses_changed_settings_and_returns_a_finished_run(setup, one_thread):
    root, model, data = setup
    cfg = run_config(model, data, root / "finished")
    cfg.max_steps = 2
    result = train(cfg)
    changed = run_config(model, data, root / "finished")
    changed.max_steps, changed.lr = 2, 1e-2
    with pytest.raises(ConfigError, match=r"different settings \(lr: 0.002 -> 0.01\)"):
        train(changed, resume=True)
    assert train(cfg, resume=True) == result  # nothing left to do
    # A run begun under other defaults (before the head lr cap, 10 x resolved at this lr) resumes as it
    # began: the recipe fields left unset take the saved values instead of being refused as changed.
    saved = root / "finished" / "train_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "head_lr_ratio": 10.0}))
    assert cfg.head_lr_ratio is None and train(cfg, resume=True) == result

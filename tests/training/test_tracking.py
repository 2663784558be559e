"""--report-to: a real `lorakit train` run records into MLflow's file store, an offline W&B run and TensorBoard
event files, read back here through each library's own format; the terminal shows lorakit's lines only; a
missing package is one line naming the extra."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.training.tracking import requested
from tiny import make_tiny_bert
from train_util import write_sentiment_csv

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("mlflow", reason="the track extra (pip install 'lorakit[track]')")
pytest.importorskip("wandb", reason="the track extra (pip install 'lorakit[track]')")
pytest.importorskip("tensorboard", reason="the track extra (pip install 'lorakit[track]')")


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB
    whose records (4-byte CRC, 2-byte length, 1-byte type) may be split FIRST / MIDDLE / LAST."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def items(update) -> dict:
    """key -> value of a record's items (W&B writes a key either whole or as its nested parts)."""
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    model = make_tiny_bert(root / "tiny-bert")
    data = write_sentiment_csv(root / "data", n_train=24, n_test=8)
    out = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HOME=str(root))  # no ~/.netrc key
    cmd = [
        sys.executable, "-m", "lorakit", "train", "--model", str(model), "--task", "text", "--data", str(data),
        "--out", str(out), "--max-steps", "4", "--eval-interval", "2", "--batch-size", "8", "--max-length", "32",
        "--log-interval", "1", "--report-to", "mlflow,wandb,tensorboard", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, json.loads((out / "eval_results.json").read_text())


def test_mlflow_file_store_holds_config_metrics_scores_adapter_and_plot(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store on this opt-in

    out, _, final = tracked_run
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.data.params["r"] == "8" and run.data.params["report_to"] == "['mlflow', 'wandb', 'tensorboard']"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid/accuracy")] == [2, 4]
    assert run.data.metrics["eval/accuracy"] == pytest.approx(final["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "training.png" in artifacts
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    assert run.info.status == "FINISHED"


def test_wandb_offline_run_holds_config_history_and_summary(tracked_run):
    out, _, final = tracked_run
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    # The settings come with the run record (wandb.init's config) and any later config record.
    updates = [r.run.config if r.HasField("run") else r.config for r in records if r.HasField("run") or
               r.HasField("config")]  # fmt: skip
    config = {k: v for u in updates for k, v in items(u.update).items()}
    assert config["r"] == 8 and config["task"] == "text"
    steps = [items(r.history.item) for r in records if r.HasField("history")]
    losses = [h for h in steps if "train/loss" in h]
    assert [h["_step"] for h in losses] == [1, 2, 3, 4]
    assert any(k.startswith("training_plot") for h in steps for k in h)  # the image, by its file
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(items(r.summary.update))
    assert summary["eval/accuracy"] == pytest.approx(final["accuracy"])
    assert "exit" in kinds  # the run was finished


def test_tensorboard_event_files_hold_metrics_scores_and_plot(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, final = tracked_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("valid/accuracy")] == [2, 4]
    (score,) = events.Scalars("eval/accuracy")
    assert score.value == pytest.approx(final["accuracy"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in logged if r.get("split") == "train"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_losses)
    assert tags["images"] == ["training_plot"]
    (plot,) = events.Images("training_plot")
    assert plot.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and plot.width > 100


def test_the_terminal_shows_lorakit_lines_only(tracked_run):
    _, proc, _ = tracked_run
    lines = [seg for line in proc.stderr.split("\n") for seg in line.split("\r")]
    progress = ("train:", "eval:", "valid:", "generate:", "step ", "\x1b[A")
    foreign = [ln for ln in lines if ln.strip() and not ln.strip().startswith(progress)
               and not ln.startswith(("lorakit", "  "))]  # fmt: skip
    assert not foreign, foreign
    assert "wandb" not in proc.stderr.replace("report_to", "").lower().replace("'mlflow', 'wandb'", "")
    assert "tensorflow" not in proc.stderr.lower()


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from lorakit.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    data = write_sentiment_csv(tmp_path / "data", n_train=8, n_test=4)
    code = main(["train", "--task", "text", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--report-to", "wandb"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["lorakit train: error: report_to wandb: the wandb package is not installed "
                   "(pip install 'lorakit[track]')"]  # fmt: skip


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    from lorakit.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    data = write_sentiment_csv(tmp_path / "data", n_train=8, n_test=4)
    code = main(["train", "--task", "text", "--data", str(data), "--out", str(tmp_path / "o"), "--tensorboard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["lorakit train: error: report_to tensorboard: the tensorboard package is not installed "
                   "(pip install 'lorakit[track]')"]  # fmt: skip
    assert not (tmp_path / "o" / "tensorboard").exists()


def test_tensorboard_flag_is_an_alias_and_unknown_trackers_are_refused():
    from lorakit import ConfigError
    from train_util import base_cfg

    assert requested(None, True) == ["tensorboard"]
    assert requested(["mlflow", "tensorboard"], True) == ["mlflow", "tensorboard"]
    assert base_cfg(task="text", data="d", report_to="mlflow, wandb").report_to == ["mlflow", "wandb"]
    with pytest.raises(ConfigError, match="unknown tracker"):
        base_cfg(task="text", data="d", report_to="neptune")

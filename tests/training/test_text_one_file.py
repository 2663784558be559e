"""`lorakit train --task text --train-file train.csv` with one labelled file: the validation split is carved
and printed, truncation is reported, the final metrics are labelled as the validation split's, the adapter is
saved and `lorakit eval` scores it on a separate test file; the test file never changes what is trained."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from lorakit.cli import main

POSITIVE = ["a warm and funny film", "great acting and a clever plot", "I loved every minute of it"]
NEGATIVE = ["dull and slow and far too long", "the plot makes no sense at all", "I wanted my money back"]


def _csv(path: Path, n: int, tag: str) -> Path:
    lines = ["text,label"]
    for i in range(n):
        words = (POSITIVE if i % 2 else NEGATIVE)[i % 3] + f" {tag} {i}" + (" very" * 30 if i % 5 == 0 else "")
        lines.append(f"{words},{'good' if i % 2 else 'bad'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train(train: Path, out: Path, extra: list[str] = ()) -> int:  # type: ignore[assignment]
    return main(["train", "--task", "text", "--train-file", str(train), "--model", "minilm-l6", "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "16", "--eval-interval", "1",
                 "--no-plot", *extra])  # fmt: skip


def test_one_labelled_file_trains_carves_reports_and_eval_scores_it(tmp_path, capsys, one_thread):
    train = _csv(tmp_path / "train.csv", 30, "train")
    assert _train(train, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert f"text: no valid file; carved 4 of 30 records of {train} (split_seed 0, stratified by label)" in err
    assert "text: 6 of 26 training examples (23 %) are cut at --max-length 16; the longest has 41 tokens" in err
    assert "the final metrics are measured on the validation split carved from" in err
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["truncation"]["train"]["cut"] == 6 and summary["examples"] == {"train": 26, "valid": 4, "eval": 4}
    assert summary["validation"] == "carved" and summary["scored_on"].startswith("the validation split carved")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["split"] == "eval" and last["scored_on"] == summary["scored_on"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["label_names"] == ["bad", "good"]
    test = _csv(tmp_path / "test.csv", 8, "test")
    assert main(["eval", "--adapter", str(tmp_path / "run"), "--eval-file", str(test), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert set(scored) == {"accuracy", "macro_f1"}


def test_the_test_file_never_changes_training_or_validation(tmp_path, capsys, one_thread):
    folders = []
    for k, n_test in enumerate((4, 12)):
        folder = tmp_path / f"data{k}"
        folder.mkdir()
        _csv(folder / "train.csv", 30, "train")
        _csv(folder / "test.csv", n_test, f"test{k}")
        assert main(["train", "--task", "text", "--data", str(folder), "--model", "minilm-l6", "--out",
                     str(folder / "run"), "--max-steps", "2", "--batch-size", "4", "--max-length", "16",
                     "--eval-interval", "1", "--no-plot"]) == 0  # fmt: skip
        folders.append(folder / "run")
    capsys.readouterr()
    logs = [[json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()] for f in folders]
    valid = [[r for r in log if r["split"] == "valid"] for log in logs]
    assert valid[0] == valid[1] and len(valid[0]) == 2
    weights = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_too_small_to_carve_trains_without_validation(tmp_path, capsys, one_thread):
    train = _csv(tmp_path / "train.csv", 8, "train")
    assert _train(train, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "too few to carve a validation split from" in err and "training without validation" in err
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text()) == {}
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

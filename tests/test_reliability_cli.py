"""Issue 15, the command line: merge refuses and replaces --out atomically (kill -9 included), and no bad
input or file-system failure prints a traceback: each is one `lorakit <cmd>: error: ...` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli import main
from lorakit.io.fsutil import KILL_ENV
from tiny import make_tiny_bert, randomize_lora
from train_util import write_sentiment_csv

REPO = Path(__file__).resolve().parents[1]
INPUT = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 2307, 102]])}


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny BERT base folder and a LoRA adapter for it (with a trained classifier head)."""
    from lorakit.io.models import load_model

    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_bert(root / "base")
    torch.manual_seed(0)
    model, _ = load_model(base, "seq-cls", num_labels=2)
    inject(model, LoraConfig(targets=("q", "v"), modules_to_save=("classifier",)))
    randomize_lora(model, std=0.05)
    save_adapter(model, root / "adapter")
    with torch.no_grad():
        expected = model.eval()(**INPUT).logits
    return base, root / "adapter", expected


def _merge(base, adapter, out, *extra) -> int:
    return main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), *extra])


def _merged_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        return AutoModelForSequenceClassification.from_pretrained(out).eval()(**INPUT).logits


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"lorakit {command}: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# == 5. merge: refuse, or replace atomically ===============================================================
@pytest.mark.parametrize("existing", ["file", "folder"])
def test_merge_refuses_an_out_it_did_not_write_even_with_overwrite(base_and_adapter, tmp_path, capsys, existing):
    base, adapter, _ = base_and_adapter
    out = tmp_path / "m"
    if existing == "file":
        out.write_text("precious")
    else:  # another model's folder, with a weight shard the merge would not overwrite
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()
    for extra in ((), ("--overwrite",)):
        assert _merge(base, adapter, out, *extra) == 1
        line = _one_error_line(capsys, "merge")
        assert ("is a file" if existing == "file" else "did not write") in line, line
        assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else out.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no lock or temporary folder left


def test_merge_overwrite_replaces_only_its_own_files(base_and_adapter, tmp_path, capsys):
    base, adapter, expected = base_and_adapter
    out = tmp_path / "m"
    assert _merge(base, adapter, out) == 0
    assert _merge(base, adapter, out) == 1
    line = _one_error_line(capsys, "merge")
    assert "already holds" in line and "--overwrite" in line
    # The user's files beside the merged model, and a shard an earlier merge wrote that this one does not.
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    marker = json.loads((out / ".lorakit-output.json").read_text())
    marker["files"].append("model-00002-of-00002.safetensors")
    (out / ".lorakit-output.json").write_text(json.dumps(marker))
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    assert _merge(base, adapter, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "scores.json").read_text() == "{}"
    assert not (out / "model-00002-of-00002.safetensors").exists()  # its own stale shard: gone
    torch.testing.assert_close(_merged_logits(out), expected, atol=1e-5, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder or lock left
    own = [f for f in out.iterdir() if f.is_file() and f.name != "notes.txt"]
    assert len({f.stat().st_mode & 0o777 for f in own}) == 1  # one file mode, not 0600 and 0644


def test_merge_overwrite_out_dot_never_wipes_the_working_directory(base_and_adapter, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    base, adapter, _ = base_and_adapter
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('precious')")
    (work / "README").write_text("precious")
    monkeypatch.chdir(work)
    assert _merge(base, adapter, ".", "--overwrite") == 1
    assert "did not write" in _one_error_line(capsys, "merge")
    assert sorted(p.name for p in work.iterdir()) == ["README", "src"]
    assert (work / "src" / "main.py").read_text() == "print('precious')"


def _earlier_merge_output(out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / ".lorakit-output.json").write_text(json.dumps({"command": "merge", "files": ["config.json"]}))


@pytest.mark.parametrize("window", ["folder:written", "folder:replaced"])
def test_a_kill_during_merge_leaves_the_old_out_or_the_new_one_and_no_leftovers(base_and_adapter, tmp_path, window):
    base, adapter, expected = base_and_adapter
    out = tmp_path / "m"
    _earlier_merge_output(out)
    # A real process (not a fork: a forked child of a process running torch can deadlock in its threads).
    env = {**os.environ, KILL_ENV: window, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    argv = ["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"]
    done = subprocess.run([sys.executable, "-m", "lorakit", "merge", *argv], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    if window == "folder:written":  # before the swap: the old folder, untouched
        assert json.loads((out / "config.json").read_text()) == {"old": True}
    else:  # after: the complete new model
        torch.testing.assert_close(_merged_logits(out), expected, atol=1e-5, rtol=0)
    assert _merge(base, adapter, out, "--overwrite") == 0  # the next merge clears what the kill left
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # the dead merge's lock was taken over and released
    torch.testing.assert_close(_merged_logits(out), expected, atol=1e-5, rtol=0)


# == also: no traceback for bad input or file-system failures ============================================
def _bad_inputs(tmp: Path, base: Path, adapter: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, expected text of the error line)."""
    data = write_sentiment_csv(tmp / "data", 8, 4)
    (tmp / "a_file").write_text("x")
    deep = tmp / "deep"
    deep.mkdir()
    rows = ["text,label"] + [f"row number {i} is fine,{i % 2}" for i in range(5000)]
    (deep / "train.csv").write_bytes(("\n".join(rows) + "\n").encode() + b"bad \xff byte,1\n")
    (deep / "test.csv").write_text("text,label\nok,0\n")
    train = ["--task", "text", "--max-steps", "1", "--batch-size", "2"]
    return [
        ("train", [*train, "--data", str(data), "--out", str(tmp / "a_file")], "is a file, not a folder"),
        ("train", [*train, "--data", str(data), "--out", str(tmp / "o"), "--model", str(tmp / "nope")],
         "no such folder"),
        ("train", [*train, "--data", str(data), "--out", str(tmp / "o2"), "--model", "../../etc"], "no such folder"
         if not Path("../../etc").is_dir() else "holds no config.json"),
        ("train", [*train, "--data", str(deep), "--out", str(tmp / "o3")], "train.csv, line 5002: not valid UTF-8"),
        ("merge", ["--model", str(tmp / "nope"), "--adapter", str(adapter), "--out", str(tmp / "m")], "no such folder"),
        ("merge", ["--model", str(base), "--adapter", str(adapter), "--out", str(tmp / "a_file")], "is a file"),
        ("merge", ["--model", str(base), "--adapter", str(adapter), "--out", str(tmp / "a_file" / "m"),
                   "--overwrite"], "is a file"),
        ("merge", ["--model", str(base), "--adapter", str(adapter), "--out", str(adapter.parent), "--overwrite"],
         "holds the adapter being merged"),
        ("info", [str(tmp / "nope")], "does not exist"),
    ]  # fmt: skip


def test_no_bad_input_prints_a_traceback(base_and_adapter, tmp_path, capsys, one_thread):
    base, adapter, _ = base_and_adapter
    for command, argv, expected in _bad_inputs(tmp_path, base, adapter):
        assert main([command, *argv]) == 1, argv
        line = _one_error_line(capsys, command)
        assert expected in line, (argv, line)


def test_eval_does_not_trust_the_base_path_an_adapter_file_names(base_and_adapter, tmp_path, capsys):
    _, adapter, _ = base_and_adapter
    planted = tmp_path / "ad"
    planted.mkdir()
    for f in adapter.iterdir():
        (planted / f.name).write_bytes(f.read_bytes())
    raw = json.loads((planted / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = "../../etc"
    (planted / "adapter_config.json").write_text(json.dumps(raw))
    assert main(["eval", "--adapter", str(planted), "--task", "sst2", "--data", str(tmp_path)]) == 1
    assert "--model is required" in _one_error_line(capsys, "eval")

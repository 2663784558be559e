"""Issue 29, items 1, 2 and 11: `--overwrite` replaces only a command's own files (train, combine; merge is in
test_reliability_cli.py), one writer per output folder (a PID lock, stale ones taken over), and a full disk
(a real, small tmpfs) is one error line with nothing half-written, for every command that saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.io.outputs import LOCK_NAME, output_lock
from tiny import make_tiny_bert, randomize_lora
from train_util import write_sentiment_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return make_tiny_bert(root / "base"), write_sentiment_csv(root / "data", 8, 4)


def _train(base: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--task", "text", "--data", str(data), "--model", str(base), "--out", str(out),
                 "--max-steps", "1", "--batch-size", "4", "--no-plot", *extra])  # fmt: skip


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"lorakit {command}: error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def _adapter(path: Path, rank: int = 8, seed: int = 1) -> Path:
    from tiny import tiny_bert

    model = tiny_bert()
    inject(model, LoraConfig(r=rank, targets=("q", "v")))
    randomize_lora(model, seed=seed)
    save_adapter(model, path)
    return path


def _combine(inputs: list[Path], out: Path, *extra: str) -> int:
    return main(["combine", *map(str, inputs), "--out", str(out), "--mode", "linear", *extra])


# == 1. --overwrite: one meaning ========================================================================
def test_train_refuses_a_folder_of_foreign_files_even_with_overwrite(bert_and_data, tmp_path, capsys,
                                                                      one_thread):  # fmt: skip
    base, data = bert_and_data
    out = tmp_path / "project"
    (out / "checkpoints").mkdir(parents=True)  # a user's own folder of that name: --overwrite deleted it
    (out / "checkpoints" / "mine.pt").write_text("precious")
    (out / "notes.md").write_text("precious")
    assert _train(base, data, out, "--overwrite") == 1
    assert "did not write" in _one_error_line(capsys, "train")
    assert (out / "checkpoints" / "mine.pt").read_text() == "precious" and sorted(os.listdir(out)) == [
        "checkpoints", "notes.md"]  # fmt: skip


def test_train_overwrite_keeps_the_users_files_in_its_own_run_folder(bert_and_data, tmp_path, capsys,
                                                                      one_thread):  # fmt: skip
    base, data = bert_and_data
    out = tmp_path / "run"
    assert _train(base, data, out) == 0
    (out / "notes.md").write_text("mine")
    assert _train(base, data, out) == 1
    assert "--overwrite" in _one_error_line(capsys, "train")
    assert _train(base, data, out, "--overwrite") == 0
    assert (out / "notes.md").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()


def test_combine_overwrite_refuses_another_commands_output_and_keeps_foreign_files(tmp_path, capsys):
    inputs = [_adapter(tmp_path / "a", seed=1), _adapter(tmp_path / "b", seed=2)]
    out = tmp_path / "c"
    assert _combine(inputs, out) == 0
    (out / "README.md").write_text("mine")
    assert _combine(inputs, out) == 1
    assert "--overwrite" in _one_error_line(capsys, "combine")
    assert _combine(inputs, out, "--weights", "1,-1", "--overwrite") == 0
    assert (out / "README.md").read_text() == "mine"
    merged = tmp_path / "merged"  # a merge's output is not a combine's, whatever the flag
    merged.mkdir()
    (merged / ".lorakit-output.json").write_text(json.dumps({"command": "merge", "files": ["config.json"]}))
    (merged / "config.json").write_text("{}")
    assert _combine(inputs, merged, "--overwrite") == 1
    assert "output of `lorakit merge`" in _one_error_line(capsys, "combine")
    assert sorted(os.listdir(merged)) == [".lorakit-output.json", "config.json"]


# == 2. one writer per output folder ====================================================================
_HOLD = """
import sys, time
from pathlib import Path
from lorakit.io.outputs import LOCK_NAME, output_lock
out = Path(sys.argv[1])
with output_lock(out / LOCK_NAME, out):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_train_into_a_locked_run_folder_is_refused_with_one_line(bert_and_data, tmp_path):
    """Two real processes: one holds the run folder's lock, `lorakit train` into it is refused."""
    base, data = bert_and_data
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["--task", "text", "--data", str(data), "--model", str(base), "--out", str(out), "--max-steps", "1",
                "--batch-size", "4", "--no-plot"]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "lorakit", "train", *argv], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert f"being written by another lorakit process (pid {holder.pid})" in lines[0]
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # the refused run wrote nothing
    # The holder died without releasing: its lock is stale and the next run takes it over.
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", *argv], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / LOCK_NAME).exists() and (out / "adapter_model.safetensors").is_file()


def test_two_concurrent_combines_into_one_out_one_is_refused(tmp_path):
    inputs = [_adapter(tmp_path / "a", seed=1), _adapter(tmp_path / "b", seed=2)]
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = [*map(str, inputs), "--out", str(out), "--mode", "linear"]
        done = subprocess.run([sys.executable, "-m", "lorakit", "combine", *argv], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1 and "being written by another lorakit process" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_lock_is_released_and_refuses_a_second_holder_in_process(tmp_path):
    out = tmp_path / "new" / "run"
    with output_lock(out / LOCK_NAME, out):
        assert int((out / LOCK_NAME).read_text()) == os.getpid()
        with pytest.raises(ConfigError, match="being written by another lorakit process"), output_lock(
                out / LOCK_NAME, out):
            pass
    assert not (tmp_path / "new").exists()  # created for the lock, nothing written: removed again


def test_a_lock_without_a_pid_is_honoured_while_fresh(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("")  # a writer between creating the lock and writing its PID
    with pytest.raises(ConfigError, match="being written"), output_lock(out / LOCK_NAME, out):
        pass
    old = time.time() - 3600
    os.utime(out / LOCK_NAME, (old, old))
    with output_lock(out / LOCK_NAME, out):
        pass


# == 11. a real full disk ===============================================================================
@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)], capture_output=True,
                             text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def _fill_leaving(fs: Path, free: int) -> None:
    """Fill ``fs`` so that about ``free`` bytes stay available."""
    stat = os.statvfs(fs)
    with open(fs / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name == LOCK_NAME)


@pytest.mark.parametrize("where", ["final save", "checkpoint"])
def test_a_full_disk_during_training_saves_is_one_line(bert_and_data, small_fs, capsys, where,
                                                        one_thread):  # fmt: skip
    base, data = bert_and_data
    out = small_fs / "run"
    _fill_leaving(small_fs, 96 << 10)  # room for the config and logs, not for a rank-256 adapter
    extra = ["--r", "256", "--save-interval", "1" if where == "checkpoint" else "0"]
    assert _train(base, data, out, *extra) == 1
    line = _one_error_line(capsys, "train")
    assert "No space left on device" in line, line
    assert not list(out.glob("adapter*")) and _leftovers(out) == []
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True


def test_a_full_disk_during_merge_is_one_line_and_leaves_no_out(tmp_path, small_fs, capsys):
    from lorakit.io.models import load_model

    base = make_tiny_bert(tmp_path / "base")
    model, _ = load_model(base, "seq-cls", num_labels=2)
    inject(model, LoraConfig(targets=("q", "v")))
    save_adapter(model, tmp_path / "adapter")
    _fill_leaving(small_fs, 16 << 10)  # config.json fits, the weights do not
    out = small_fs / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 1
    line = _one_error_line(capsys, "merge")
    assert "No space left on device" in line, line
    assert sorted(os.listdir(small_fs)) == ["filler"]  # no --out, no temporary folder, no lock


def test_a_full_disk_during_combine_is_one_line_and_leaves_no_empty_out(tmp_path, small_fs, capsys):
    inputs = [_adapter(tmp_path / "a", rank=64, seed=1), _adapter(tmp_path / "b", rank=64, seed=2)]
    _fill_leaving(small_fs, 16 << 10)
    out = small_fs / "combined"
    assert _combine(inputs, out) == 1
    line = _one_error_line(capsys, "combine")
    assert "No space left on device" in line, line
    assert sorted(os.listdir(small_fs)) == ["filler"]



@pytest.mark.parametrize("fmt", ["gguf-adapter", "hf"])
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path, small_fs, capsys, smollm2_path, fmt):
    from export_util import make_adapter

    adapter = make_adapter(tmp_path / "ad", r=8, targets=("q", "v"))
    _fill_leaving(small_fs, 16 << 10)  # the adapter's tensors (and the model's shards) do not fit
    out = small_fs / "export"
    assert main(["export", "--adapter", str(adapter), "--format", fmt, "--out", str(out)]) == 1
    line = _one_error_line(capsys, "export")
    assert "No space left on device" in line, line
    assert sorted(os.listdir(small_fs)) == ["filler"]  # no --out, no temporary, no lock

def test_disk_errors_turns_only_os_failures_of_safetensors_into_os_errors(small_fs):
    from safetensors import SafetensorError
    from safetensors.torch import load, save_file

    from lorakit.io.fsutil import disk_errors

    _fill_leaving(small_fs, 0)
    target = small_fs / "x.safetensors"
    with pytest.raises(OSError, match="No space left on device") as caught, disk_errors(target):
        save_file({"a": torch.zeros(1 << 16)}, target)
    assert caught.value.filename == str(target)
    with pytest.raises(SafetensorError), disk_errors(small_fs / "y.safetensors"):  # not a disk failure: as is
        load(b"not a safetensors file")

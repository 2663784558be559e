"""``lorakit export --format hf``: merged SmolLM2 as safetensors shards in the asked dtype; never over
someone else's files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from export_util import lorakit_delta_w, make_adapter
from lorakit.cli import main
from lorakit.io.outputs import MARKER_NAME as MARKER


def _export(adapter, out, *extra) -> int:
    return main(["export", "--adapter", str(adapter), "--format", "hf", "--out", str(out), *extra])


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def test_bf16_export_holds_the_merged_weights_and_only_its_files(tmp_path, smollm2_path, capsys):
    adapter = make_adapter(tmp_path / "ad", r=4, alpha=8.0, targets=("q", "v"))
    out = tmp_path / "merged"
    assert _export(adapter, out, "--dtype", "bf16") == 0
    assert "bf16, 1 safetensors shard(s), 60 weights changed" in capsys.readouterr().out
    weights = _weights(out)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    listed = json.loads((out / MARKER).read_text())["files"]
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == listed
    base = _weights(Path(smollm2_path))
    delta = lorakit_delta_w(adapter)
    key = "model.layers.3.self_attn.q_proj"
    expected = (base[f"{key}.weight"].double() + torch.from_numpy(delta[key])).to(torch.bfloat16)
    assert torch.equal(weights[f"{key}.weight"], expected)
    untouched = "model.layers.3.self_attn.k_proj.weight"
    assert torch.equal(weights[untouched], base[untouched].to(torch.bfloat16))


def test_default_dtype_is_the_bases_and_overwrite_replaces_only_an_export(tmp_path, smollm2_path, capsys):
    adapter = make_adapter(tmp_path / "ad", r=2, targets=("q",))
    out = tmp_path / "merged"
    assert _export(adapter, out) == 0
    assert "fp32" in capsys.readouterr().out  # the built-in is converted to fp32 once
    assert _export(adapter, out) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert _export(adapter, out, "--overwrite", "--dtype", "fp16") == 0
    assert {t.dtype for t in _weights(out).values()} == {torch.float16}
    (out / "README.md").write_text("mine")
    assert _export(adapter, out, "--overwrite") == 1
    assert "holds 'README.md', which the earlier export did not write" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "mine"


def test_folder_of_foreign_files_is_refused(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "model.safetensors").write_text("x")
    assert _export(tmp_path, out, "--overwrite") == 1
    assert "holds files `lorakit export` did not write (model.safetensors)" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "x"


def test_overwrite_into_an_earlier_export_holding_a_foreign_file_refuses_and_keeps_it(tmp_path, capsys):
    from lorakit.io.outputs import write_folder_atomically

    out = tmp_path / "merged"
    write_folder_atomically(out, lambda tmp: (tmp / "model.safetensors").write_bytes(b"earlier"), command="export")
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("mine")
    assert _export(tmp_path, out, "--overwrite") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 'notes', which the earlier export did not write" in err
    assert (out / "notes" / "mine.txt").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder, no lock left


def test_a_second_writer_of_the_same_out_is_refused(tmp_path, capsys):
    import os

    out = tmp_path / "merged"
    lock = tmp_path / ".merged.lock"
    lock.write_text(f"{os.getppid()}\n")  # a live process that is not this one holds it
    assert _export(tmp_path, out) == 1
    err = capsys.readouterr().err.strip()
    assert f"being written by another lorakit process (pid {os.getppid()})" in err
    assert not out.exists() and lock.read_text() == f"{os.getppid()}\n"
    lock.write_text("999999999\n")  # a writer that died: its lock is taken over, then released
    assert _export(tmp_path, out) == 1  # tmp_path is no adapter: the export itself fails, past the lock
    assert "being written" not in capsys.readouterr().err
    assert not lock.exists() and not out.exists()

"""Where an export lands: refuse to overwrite what is not an earlier export, and write atomically.

A file export replaces only a GGUF (or text file it wrote itself, by suffix); a folder export replaces only a
folder whose marker (:data:`MARKER`) lists every file in it. A failed or killed write leaves the old output
(or none) and no temporary behind after the next run.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import ExportError
from lorakit.io.fsutil import file_mode, fsync_dir, remove, replace_path, stale_temps

MARKER = "lorakit-export.json"  # written last into a folder export: {"format": ..., "files": [...]}
GGUF_MAGIC = b"GGUF"


def check_file_out(out: Path, overwrite: bool, kind: str = "gguf") -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is a file this export could have written.

    Args:
        out: the output file.
        overwrite: whether replacing it was asked for.
        kind: ``"gguf"`` (must start with the GGUF magic) or ``"modelfile"`` (must start with ``FROM ./``).
    """
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; this format writes one file")
    if not overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace it")
    magic, what = (GGUF_MAGIC, "a GGUF file") if kind == "gguf" else (b"FROM ./", "a Modelfile lorakit wrote")
    with open(out, "rb") as fh:
        if fh.read(len(magic)) != magic:
            raise ExportError(f"{out} is not {what}: lorakit export replaces only its own outputs")


def check_folder_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` and it is an earlier folder export.

    Args:
        out: the output folder.
        overwrite: whether replacing it was asked for.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; --format hf writes a folder")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    if not overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace an earlier export")
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(f"--out {out} holds files not written by lorakit export (no {MARKER}); "
                          "choose another folder") from None
    foreign = [name for name in present if name not in listed and name != MARKER]
    if foreign:
        raise ExportError(f"--out {out} holds {foreign[0]!r}, which the earlier export did not write; "
                          "choose another folder")


def write_file_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` fill a temporary sibling of ``out``, then rename it to ``out`` in one step.

    Args:
        out: the file to create or replace.
        write: writes the file at the path it is given.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_temps(out.parent, f".{out.name}.tmp-*"):
        remove(leftover)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        replace_path(tmp, out)
    except OSError as exc:
        raise_if_disk_full(out, exc)
        raise
    finally:
        remove(tmp)
    fsync_dir(out.parent)
    return out


def raise_if_disk_full(out: Path, exc: OSError) -> None:
    """Turn a full disk (or quota) into one line; other OS errors are left to the caller.

    Args:
        out: what was being written.
        exc: the error the write raised.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise ExportError(f"no space left writing {out}; nothing was written") from exc


def write_folder_atomically(out: Path, write: Callable[[Path], object], fmt: str) -> list[str]:
    """Let ``write(tmp)`` fill a fresh sibling folder, add the marker listing its files, then put it at
    ``out`` in one step (an earlier export there is replaced whole; :func:`check_folder_out` vetted it).

    Args:
        out: the folder to create or replace.
        write: fills the folder it is given.
        fmt: the export format, recorded in the marker.

    Returns:
        The names of the files written (the marker excluded).
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_temps(out.parent, f".{out.name}.tmp-*"):
        remove(leftover)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"format": fmt, "files": names}, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_path(tmp, out)
    except OSError as exc:
        raise_if_disk_full(out, exc)
        raise
    finally:
        remove(tmp)
    return names

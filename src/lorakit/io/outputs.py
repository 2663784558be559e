"""Command outputs: the one ``--overwrite`` rule (a command replaces only what it wrote, recognised by its
marker), the PID lock that keeps two writers off one ``--out``, and atomic whole-file and whole-folder writes.
"""


from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.io.fsutil import (
    _TMP_PID,
    debug_kill_point,
    disk_errors,
    file_mode,
    pid_alive,
    remove,
    replace_path,
    stale_temps,
)

# == --out: one rule for every command that writes a folder ===============================================
MARKER_NAME = ".lorakit-output.json"
LOCK_NAME = ".lorakit.lock"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The record a lorakit command left in an output folder it wrote (None without a readable one).

    Args:
        folder: the output folder.
    """
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8")[:65536])
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("command"), str) else None


def mark_output(folder: Path, command: str, files: list[str] | None = None) -> None:
    """Record in ``folder`` that ``lorakit command`` wrote it (and which files, when it writes a set that
    varies), so a later ``--overwrite`` can tell its own earlier output from anything else.

    Args:
        folder: the output folder.
        command: the command's name, e.g. ``"merge"``.
        files: the paths it wrote, relative to ``folder``.
    """
    tmp = folder / f".{MARKER_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"command": command, "files": files}, indent=1))
    os.chmod(tmp, file_mode())
    os.replace(tmp, folder / MARKER_NAME)


def _entries(folder: Path) -> list[str]:
    """What ``folder`` holds, less lorakit's bookkeeping: the marker, the lock, killed writers' temp files."""
    names = sorted(e.name for e in folder.iterdir())
    return [n for n in names if n not in (MARKER_NAME, LOCK_NAME) and not (n[0] == "." and _TMP_PID.search(n))]


def claim_output(
    out: Path,
    command: str,
    *,
    overwrite: bool,
    own_names: Collection[str] = (),
    held: Callable[[Path], str | None] | None = None,
    hint: str = "pass --overwrite to replace it",
    refuse_foreign: bool = False,
) -> None:
    """The one rule for ``--out`` (merge, combine, train, export): a new or empty folder is written freely;
    a folder holding an earlier output of the same command needs ``--overwrite``, which replaces only the
    files that command writes; anything else (a file, another command's output, foreign files) is refused,
    so no command ever deletes what it did not write.

    An earlier output is recognised by the marker the command left (``mark_output``) or, for folders from
    before markers, by holding nothing but names in ``own_names``.

    Args:
        out: the output folder.
        command: the command's name, e.g. ``"merge"``.
        overwrite: whether ``--overwrite`` was given.
        own_names: the exact names the command writes (empty: recognised by its marker only).
        held: describes what of an earlier output a new one would replace (None: nothing worth keeping);
            by default any earlier output is.
        hint: how to proceed, appended to the refusal of an earlier output.
        refuse_foreign: refuse an earlier output holding entries its marker does not list, rather than
            carry them over (``write_folder_atomically``) into the replacement.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} is a file, not a folder")
    entries = _entries(out) if out.is_dir() else []
    if not entries:
        return
    marker = read_marker(out)
    if marker is not None and marker["command"] != command:
        raise ConfigError(f"--out {out} holds the output of `lorakit {marker['command']}`, not of "
                          f"`lorakit {command}`: choose another folder")  # fmt: skip
    if marker is None and not set(entries) <= set(own_names):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ConfigError(f"--out {out} already exists and holds files `lorakit {command}` did not write "
                          f"({shown}): choose a new or empty folder")  # fmt: skip
    what = held(out) if held is not None else f"the output of an earlier `lorakit {command}`"
    if what and not overwrite:
        raise ConfigError(f"--out {out} already holds {what}: {hint}")
    if refuse_foreign and (foreign := foreign_entries(out)):
        raise ConfigError(f"--out {out} holds {foreign[0]!r}, which the earlier {command} did not write; "
                          "choose another folder")  # fmt: skip


def foreign_entries(out: Path) -> list[str]:
    """The top-level entries of an earlier output that its command did not write (a user's notes, say):
    every entry not listed in its marker.

    Args:
        out: an output folder that ``claim_output`` accepted.
    """
    if not out.is_dir():
        return []
    listed = (read_marker(out) or {}).get("files") or []
    own = {str(f).split("/")[0] for f in listed if isinstance(f, str)}
    return [n for n in _entries(out) if n not in own]


def carry_over(source: Path, target: Path) -> None:
    """Recreate ``source`` (a file, link or folder tree) at ``target`` with hard links, copying only where
    linking fails, so the original stays whole until the folder holding it is replaced.

    Args:
        source: the entry to keep.
        target: where it goes (must not exist).
    """
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            carry_over(child, target / child.name)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


# == a lock per output ====================================================================================
_HELD: set[str] = set()  # lock files this process holds


def _lock_holder(lock: Path) -> int | None:
    """The PID a lock file names (None if it names none: it may be being written right now)."""
    try:
        text = lock.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else None


def _is_stale(lock: Path, holder: int | None) -> bool:
    """Whether a lock is left by a process that is gone (a PID-less lock counts once it is a minute old)."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    if holder == os.getpid():
        return str(lock) not in _HELD
    return not pid_alive(holder)


def _acquire(lock: Path, out: Path) -> None:
    for _attempt in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if not _is_stale(lock, holder):
                raise ConfigError(f"--out {out} is being written by another lorakit process (pid {holder}); "
                                  f"wait for it to finish (its lock: {lock})") from None  # fmt: skip
            lock.unlink(missing_ok=True)  # a dead writer's: take it over
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        _HELD.add(str(lock))
        return
    raise ConfigError(f"--out {out}: could not take the lock {lock}; another process keeps taking it")


def _created_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those it created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def output_lock(lock: Path, out: Path) -> Iterator[None]:
    """Hold an ``O_EXCL`` lock file naming this PID while writing ``out``: a second writer is refused with
    one line, and the lock of a writer that died (kill -9) is taken over. Folders created for the lock are
    removed again if nothing was written into them.

    Args:
        lock: the lock file (in the run folder, or beside a folder that is replaced whole).
        out: the output it guards, named in the refusal.
    """
    if lock.parent.exists() and not lock.parent.is_dir():
        raise ConfigError(f"--out {lock.parent} is a file, not a folder")
    created = _created_folders(lock.parent)
    try:
        _acquire(lock, out)
        try:
            yield
        finally:
            _HELD.discard(str(lock))
            if _lock_holder(lock) == os.getpid():
                lock.unlink(missing_ok=True)
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: nothing was written


def _seal(folder: Path) -> list[str]:
    """Give every file under ``folder`` one mode and fsync it; return their paths relative to ``folder``."""
    files = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, file_mode())  # safetensors writes 0600, the JSON beside it 0644: one mode
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files.append(f.relative_to(folder).as_posix())
    return files


def write_folder_atomically(out: Path, write: Callable[[Path], object], *, command: str,
                            overwrite: bool = False) -> Path:  # fmt: skip
    """Let ``write(tmp)`` fill a fresh sibling folder of ``out``, then put it at ``out`` in one step.

    ``claim_output``'s rule decides whether ``out`` may be replaced. What an earlier output holds that its
    command did not write is carried into the new folder (hard links), so replacing the folder deletes
    only the command's own files. A kill at any moment leaves ``out`` as it was or complete; the
    temporary folder a killed writer leaves is removed by the next write to the same ``out``.

    Args:
        out: the folder to create or replace.
        write: fills the folder it is given.
        command: the command writing it (recorded with ``mark_output``).
        overwrite: whether ``--overwrite`` was given.
    """
    out = Path(os.path.abspath(out))
    claim_output(out, command, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old.tmp-*"):
        for leftover in stale_temps(out.parent, pattern):
            remove(leftover)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove(tmp)
    try:
        tmp.mkdir()
        with disk_errors(out):
            write(tmp)
        mark_output(tmp, command, _seal(tmp))
        for name in foreign_entries(out):
            if (tmp / name).exists() or (tmp / name).is_symlink():
                raise ConfigError(f"--out {out} holds {name}, which `lorakit {command}` did not write but would "
                                  "replace: move it out first")  # fmt: skip
            carry_over(out / name, tmp / name)
        debug_kill_point("folder:written")
        replace_path(tmp, out)
        debug_kill_point("folder:replaced")
    finally:
        remove(tmp)  # still there only if something failed
    return out


# == --out of one file ====================================================================================
def starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file at ``path`` begins with ``prefix`` (a format's magic bytes, say).

    Args:
        path: the file to look at.
        prefix: the bytes it must begin with.
    """
    with open(path, "rb") as fh:
        return fh.read(len(prefix)) == prefix


def claim_file(out: Path, *, overwrite: bool, owned: Callable[[Path], bool], what: str) -> None:
    """``claim_output``'s rule for a command whose ``--out`` is one file: a missing file is written freely;
    an existing one needs ``--overwrite`` and must be one the command could have written (``owned``), so a
    folder, a link or anyone else's file is never replaced.

    Args:
        out: the output file.
        overwrite: whether ``--overwrite`` was given.
        owned: whether an existing file is of the kind the command writes.
        what: that kind, for the refusal, e.g. ``"a GGUF file"``.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink():
        raise ConfigError(f"--out {out} is a folder; this format writes one file")
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.is_symlink() or not owned(out):
        raise ConfigError(f"{out} is not {what}: lorakit replaces only its own outputs")


def write_file_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` fill a temporary sibling of ``out``, then rename it to ``out`` in one step.

    A failed write (a full disk included, reported as the ``OSError`` it is) leaves ``out`` as it was and
    no temporary; one a killed writer left is removed by the next write to the same ``out``.

    Args:
        out: the file to create or replace (``claim_file`` decides whether it may be).
        write: writes the file at the path it is given.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_temps(out.parent, f".{out.name}.tmp-*"):
        remove(leftover)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with disk_errors(out):
            write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        debug_kill_point("file:written")
        replace_path(tmp, out)
    finally:
        remove(tmp)  # still there only if something failed
    return out

"""File-system helpers for crash-safe writes: one file mode, leftovers of killed writers, directory swaps.

Every writer of lorakit builds its output under a temporary name ending in ``.tmp-<pid>`` and renames it
into place. A writer killed with SIGKILL cannot clean up after itself, so the next writer into the same
folder removes the temporary files of processes that no longer exist (never those of a live one).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

# Test hook: ``LORAKIT_DEBUG_KILL_AT=<point>`` SIGKILLs the process at that point of a save, so tests
# can prove every window of a save leaves something loadable. Never set outside tests.
KILL_ENV = "LORAKIT_DEBUG_KILL_AT"
_TMP_PID = re.compile(r"\.tmp-(\d+)")


def debug_kill_point(point: str) -> None:
    """SIGKILL this process if the test hook names ``point`` (no-op otherwise).

    Args:
        point: the name of this moment of a save, e.g. ``"adapter:weights-renamed"``.
    """
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 with the usual 022).

    ``tempfile.mkstemp`` creates 0600 files; renaming one into place would leave some of a run's files
    private and others not, so every temp file is given this mode before its rename.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(folder: Path, pattern: str) -> list[Path]:
    """Entries of ``folder`` matching glob ``pattern`` whose ``.tmp-<pid>`` writer is dead.

    Args:
        folder: where to look.
        pattern: a glob such as ``.adapter_model.safetensors.tmp-*``.
    """
    found = []
    for entry in folder.glob(pattern):
        match = _TMP_PID.search(entry.name)
        if match and int(match[1]) != os.getpid() and not pid_alive(int(match[1])):
            found.append(entry)
    return found


def remove(entry: Path) -> None:
    """Delete a file or a folder tree; missing is fine."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Persist renames inside ``path`` (best effort: not every platform opens directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with Linux's renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def replace_path(new: Path, target: Path) -> None:
    """Put ``new`` (a file or folder) at ``target``, replacing whatever is there, atomically where possible.

    A folder cannot be renamed over a non-empty one, so an existing ``target`` is swapped with ``new`` in
    one step (renameat2 exchange) and the old one, now at ``new``'s name, is deleted. Without that call
    the old target is first moved aside to ``.<name>.old-<pid>``: a kill in between leaves the old copy
    there (complete) and no target, never a mixture of the two.

    Args:
        new: the complete replacement, in the same folder as ``target``.
        target: the path to replace.
    """
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
    elif _exchange(new, target):
        remove(new)  # holds the old target now
    elif new.is_dir() or target.is_dir():
        aside = target.with_name(f".{target.name}.old.tmp-{os.getpid()}")
        os.replace(target, aside)
        os.replace(new, target)
        remove(aside)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)


# == disk errors ==========================================================================================
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile (the gguf writer) drops errno


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Report safetensors' failures to write as the ``OSError`` they are, and numpy's short writes as the
    full disk they are.

    safetensors raises its own ``SafetensorError`` (not an ``OSError``) when the disk is full or a path is
    read-only, which the CLI would print as a traceback; errors that carry no OS error are left alone.
    numpy's ``tofile`` reports a full disk as an ``OSError`` without errno ("N requested and M written").

    Args:
        path: the file or folder being written, named in the error.
    """
    try:
        yield
    except SafetensorError as exc:
        match = _OS_ERROR_CODE.search(str(exc))
        if match is None:
            raise
        code = int(match[1])
        raise OSError(code, os.strerror(code), str(path)) from exc
    except OSError as exc:
        if exc.errno is not None or not _SHORT_WRITE.search(str(exc)):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc

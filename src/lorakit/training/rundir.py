"""What a run's output folder holds, and what starting over in it may delete.

Rules (docs/reliability.md): a folder holding anything a run produced that is worth keeping (a trained
adapter or state, checkpoints, logged metrics, final results) is never reused without ``--overwrite``;
``--overwrite`` deletes the old logs and checkpoints but keeps the old trained files until the new run's
final save replaces them (atomically); a folder left by a run that failed before its first step holds
only its config and is reused freely.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

# Settings that name files or folders: compared as resolved paths, so ./runs/x and runs/x are one folder.
PATH_FIELDS = ("out", "data", "train_file", "valid_file", "eval_file", "model")


def what_it_holds(
    out: Path, trained_files: tuple[str, ...], run_files: tuple[str, ...], folders: tuple[str, ...]
) -> str | None:
    """A description of the results in ``out`` a new run would replace, or None if there are none.

    Raises ConfigError if ``out`` is a file.

    Args:
        out: the run folder.
        trained_files: names of trained-state files (an adapter, a trainable state).
        run_files: names of files only a run that trained writes (metrics, results).
        folders: sub-folders a run that trained writes (checkpoints).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return None
    trained = [n for n in trained_files if (out / n).is_file()]
    if trained:
        return f"a trained adapter or state ({', '.join(trained)})"
    logs = [n for n in run_files if (out / n).is_file() and (out / n).stat().st_size > 0]
    dirs = [n for n in folders if (out / n).is_dir() and any((out / n).iterdir())]
    if logs or dirs:
        return f"a run ({', '.join(logs + dirs)})"
    return None


def clear_run(out: Path, files: tuple[str, ...], folders: tuple[str, ...]) -> None:
    """Delete a previous run's logs and checkpoints; its trained files are left for the final save to
    replace, so a run killed before finishing loses none of the old results.

    Args:
        out: the run folder.
        files: file names to delete.
        folders: sub-folders to delete.
    """
    for name in files:
        (out / name).unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(out / folder, ignore_errors=True)


def _normalised(key: str, value: Any) -> Any:
    if key in PATH_FIELDS and isinstance(value, str) and value:
        # A built-in model name resolves under the working directory on both sides alike.
        return os.path.realpath(os.path.expanduser(value))
    return value


def changed_settings(old: dict[str, Any], new: dict[str, Any], may_change: set[str]) -> list[str]:
    """The settings of ``new`` that differ from the saved ``old`` ones (paths compared resolved).

    Args:
        old: the saved train_config.json.
        new: the resumed run's config.
        may_change: fields allowed to differ.
    """
    return [
        k for k in new if k not in may_change and _normalised(k, old.get(k)) != _normalised(k, new[k])
    ]

"""The one writer and reader of lorakit's safetensors + JSON pairs (adapters, method files, trained states).

A pair is switched atomically for readers: both files are written under temporary names, then renamed,
weights first; the config records the weights' sha256, so a reader always finds the config that belongs
to the weights in place. A config is untrusted data: its size and nesting are bounded before parsing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lorakit.errors import AdapterFileError
from lorakit.io.fsutil import debug_kill_point, disk_errors, file_mode, fsync_dir, stale_temps


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_weights_and_config(
    path: str | Path,
    tensors: dict[str, Tensor],
    weights_name: str,
    config_with: Callable[[str], dict[str, Any]],
    config_name: str,
) -> Path:
    """The one writer of lorakit's safetensors + JSON pairs (adapters, method files, trained states).

    Refuses non-finite tensors (a diverged run must not publish its weights). Each file is written and
    fsynced under a temporary name in ``path``, then renamed over the old one, weights first. Since
    ``config_with(sha256)`` records the weights' checksum, the pair is consistent at every moment a kill
    can hit: before the first rename the old pair is whole; between the renames the new weights sit
    beside the old config, and the new config waits complete under its temporary name, which
    ``read_pair`` accepts (and the next save renames into place). Leftover temporary files of killed
    writers are removed first. Other files in ``path`` are left alone.

    Args:
        path: the folder to write into (created if missing).
        tensors: the tensors of the weights file.
        weights_name: the weights file's name.
        config_with: builds the JSON config from the weights' sha256.
        config_name: the config file's name.
    """
    path = Path(path)
    check_finite(tensors, path / weights_name)
    path.mkdir(parents=True, exist_ok=True)
    settle_pair(path, config_name, weights_name)
    tmp_weights = path / f".{weights_name}.tmp-{os.getpid()}"
    tmp_config = path / f".{config_name}.tmp-{os.getpid()}"
    try:
        with disk_errors(path / weights_name):
            save_file(tensors, tmp_weights, metadata={"format": "pt"})
        os.chmod(tmp_weights, file_mode())  # safetensors creates 0600; the JSON beside it gets the umask's
        debug_kill_point("pair:weights-written")
        tmp_config.write_text(json.dumps(config_with(_sha256(tmp_weights)), indent=2, sort_keys=True))
        debug_kill_point("pair:config-written")
        for f in (tmp_weights, tmp_config):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_weights, path / weights_name)
        debug_kill_point("pair:weights-renamed")
        os.replace(tmp_config, path / config_name)
        debug_kill_point("pair:config-renamed")
        fsync_dir(path)
    finally:
        for f in (tmp_weights, tmp_config):
            f.unlink(missing_ok=True)
    return path


# A config is a few kilobytes; these bounds only stop hostile files (a 100,000-deep nest overflows the parser).
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def read_json_config(config_path: Path) -> Any:
    """Parse a JSON config file a user or an attacker may have written, within bounds.

    Args:
        config_path: the file.

    Raises:
        AdapterFileError: the file is too large, nested too deeply, or not valid UTF-8 JSON.
        OSError: the file cannot be read.
    """
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{config_path} is {size} bytes; a config may be at most {MAX_CONFIG_BYTES}")
    text = config_path.read_bytes()
    too_deep = AdapterFileError(f"{config_path} is nested more than {MAX_CONFIG_DEPTH} levels deep")
    try:
        value = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON: {exc}") from None
    if _depth(value) > MAX_CONFIG_DEPTH:
        raise too_deep
    return value


def _recorded_sha(config: dict[str, Any]) -> str | None:
    """The weights checksum a config records: top level (method files, trained states) or ``lorakit``."""
    meta = config.get("lorakit")
    sha = config.get("sha256") or (meta.get("sha256") if isinstance(meta, dict) else None)
    return sha if isinstance(sha, str) else None


def _pending_config(path: Path, config_name: str, weights_path: Path) -> tuple[Path, dict[str, Any]] | None:
    """A complete config left under its temporary name by a save killed between its two renames, if it
    (and not the config in place) records the checksum of the weights in place."""
    pending = sorted(path.glob(f".{config_name}.tmp-*"))
    if not pending or not weights_path.is_file():
        return None
    actual = _sha256(weights_path)
    for candidate in pending:
        try:
            config = read_json_config(candidate)
        except (OSError, ValueError):
            continue  # a config the kill cut short: not a complete generation
        if isinstance(config, dict) and _recorded_sha(config) == actual:
            return candidate, config
    return None


def settle_pair(path: Path, config_name: str, weights_name: str) -> None:
    """Finish a pair switch a killed save left halfway, then delete killed writers' temporary files.

    Args:
        path: the folder holding the pair.
        config_name: the config file's name.
        weights_name: the weights file's name.
    """
    config_path, weights_path = path / config_name, path / weights_name
    try:
        current = _recorded_sha(read_json_config(config_path))
    except (OSError, ValueError, AttributeError):
        current = None
    stale = stale_temps(path, f".{config_name}.tmp-*") + stale_temps(path, f".{weights_name}.tmp-*")
    found = _pending_config(path, config_name, weights_path) if stale else None
    if found is not None and found[0] in stale and current != _recorded_sha(found[1]):
        os.replace(found[0], config_path)
        fsync_dir(path)
    for leftover in stale:
        leftover.unlink(missing_ok=True)


def read_pair(path: str | Path, config_name: str, weights_name: str, what: str) -> tuple[dict[str, Any], Path]:
    """(parsed JSON, weights path) of a safetensors + JSON directory, or an error naming what is wrong.

    A save killed between its two renames leaves the new weights beside the old config, with the new
    config complete under its temporary name: that generation is the one returned, so a pair is never
    lost to a kill (the checksum decides which config belongs to the weights)."""
    path = Path(path)
    config_path, weights_path = path / config_name, path / weights_name
    if not path.is_dir():
        raise AdapterFileError(f"{what} directory {path} does not exist")
    if not weights_path.is_file():
        raise AdapterFileError(f"{path} is not a saved {what}: {weights_path.name} is missing")
    config = None
    if config_path.is_file():
        config = read_json_config(config_path)
    pending = _pending_config(path, config_name, weights_path)
    if pending is not None and (not isinstance(config, dict) or _recorded_sha(config) != _recorded_sha(pending[1])):
        config = pending[1]
    if config is None:
        raise AdapterFileError(f"{path} is not a saved {what}: {config_path.name} is missing")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path} is not a JSON object")
    return config, weights_path


def read_weights(weights_path: Path, sha256: str | None, config_name: str) -> dict[str, Tensor]:
    """The tensors of ``weights_path``, after checking them against the checksum its config recorded."""
    if sha256 and sha256 != _sha256(weights_path):
        raise AdapterFileError(
            f"{weights_path} does not match the checksum in {config_name}: the file is corrupt or was "
            "replaced without its config"
        )
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights_path} is corrupt or truncated: {exc}") from exc


def check_finite(tensors: dict[str, Tensor], weights_path: Path) -> None:
    """Refuse a weights file with a floating-point tensor holding NaN or inf, naming the tensor."""
    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise AdapterFileError(f"{weights_path}: {bad} holds NaN or infinite values")

"""The base model an adapter names, for commands whose ``--model`` may be left out.

``base_model_name_or_path`` in ``adapter_config.json`` is data written by whoever made the file: a relative
path would be resolved against the working directory and a hub id would be fetched. Only a built-in name or
an absolute path to a local transformers folder is taken from it; anything else needs ``--model``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.layout import CONFIG_NAME
from lorakit.io.models import BUILTINS
from lorakit.io.pairs import read_json_config


def named_base(adapter_config: Mapping[str, Any] | Any) -> str | None:
    """The base an adapter config names when it may be loaded as named, else None.

    Args:
        adapter_config: the parsed ``adapter_config.json`` (anything else gives None).
    """
    base = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, Mapping) else None
    if not isinstance(base, str) or not base:
        return None
    if base in BUILTINS:
        return base
    if os.path.isabs(base) and (Path(base) / "config.json").is_file():
        return base
    return None


def _adapter_config(adapter: str | Path) -> Any:
    """The adapter folder's parsed config, or None when it has none that parses."""
    try:
        return read_json_config(Path(adapter) / CONFIG_NAME)  # bounded: the file is untrusted
    except (OSError, AdapterFileError):
        return None


def adapter_base(adapter: str | Path) -> str | None:
    """The base an adapter folder names when it may be loaded as named (see :func:`named_base`), else None.

    Args:
        adapter: an adapter (or run) folder.
    """
    return named_base(_adapter_config(adapter))


def base_for(model: str | None, adapters: Sequence[str | Path]) -> str:
    """``--model`` when given, else the one base the adapters name (built-in or absolute local folder).

    A base given explicitly is still checked against each adapter's recorded fingerprint when it loads.

    Args:
        model: ``--model``, or None when it was left out.
        adapters: the adapter folders the command loads.

    Raises:
        ConfigError: no adapter, an adapter naming no usable base, or adapters naming different bases.
    """
    if model:
        return model
    if not adapters:
        raise ConfigError("--model is required: there is no --adapter to take the base from")
    named: dict[str, str] = {}
    for adapter in adapters:
        config = _adapter_config(adapter)
        base = named_base(config)
        if base is None:
            said = config.get("base_model_name_or_path") if isinstance(config, dict) else None
            what = f"names base {said!r}, not a built-in name or local folder" if said else "names no base"
            raise ConfigError(f"--adapter {adapter} {what}: pass --model NAME_OR_FOLDER")
        named[str(adapter)] = base
    if len(set(named.values())) > 1:
        listed = ", ".join(f"{a}: {b}" for a, b in named.items())
        raise ConfigError(f"the adapters name different bases ({listed}): pass --model NAME_OR_FOLDER")
    return next(iter(named.values()))

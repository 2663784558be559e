"""Values from config files and the command line, converted to ``TrainConfig`` field types.

A value's error names the field and where it came from (file or command line), so a typo costs a line,
not a run. Nothing here knows the fields themselves: ``training.config`` passes each field's annotation.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def base_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation like ``int | None``.

    Args:
        hint: a field's type annotation.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def coerce_value(name: str, value: Any, hint: Any, source: str) -> Any:
    """Convert a file/CLI value to the field's type, with an error that names the field.

    Args:
        name: the field, for the error.
        value: the value as read (a string from the command line, any TOML/YAML/JSON value from a file).
        hint: the field's type annotation.
        source: where the value came from, for the error.
    """
    base, optional = base_type(hint)
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")
    ):
        if not optional:
            raise ConfigError(f"{source}: {name} cannot be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typing.get_origin(base) is list:
            return coerce_list(value, typing.get_args(base)[0])
        return str(value)
    except (TypeError, ValueError):
        what = "comma-separated list of integers" if base == list[int] else getattr(base, "__name__", base)
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid {what}") from None


def coerce_list(value: Any, item: type) -> list[Any]:
    """A list from ``"a,b"`` or a sequence; items of type ``item`` (str or int: ``"0,1,5"`` → ``[0, 1, 5]``)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(value)
    if item is int:
        if any(isinstance(v, (bool, float)) for v in value):
            raise ValueError(value)
        return [int(v) for v in value]
    return [str(v) for v in value]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a flat mapping.

    A ``[train]`` table (TOML) or ``train:`` mapping (YAML) is accepted as the root, so one file can hold
    other sections too.

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML"
                ) from None
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"{path}: config files must be .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error type; all mean "this file is malformed"
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key = value at the top level")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{path}: unexpected section(s) {nested}; put training keys at the top level")
    return data

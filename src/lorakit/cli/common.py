"""Argument groups every command shares, declared once: model, adapters, device and threads, ``--json``,
seed, integer lists, and one flag per ``TrainConfig`` field.

Each ``add_*`` function takes the command's own default and help where commands differ, so a flag is spelled
and parsed the same way everywhere.
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.training.coerce import base_type
from lorakit.training.config import TrainConfig


def add_model(parser: argparse.ArgumentParser, *, required: bool = False, default: str | None = None,
              help_: str = "built-in name, local folder or hub id of the base") -> None:  # fmt: skip
    """``--model``: the base model.

    Args:
        parser: the command's parser.
        required: whether the command needs it.
        default: the value when not given.
        help_: the command's help text.
    """
    parser.add_argument("--model", required=required, default=default, help=help_)


def add_adapters(parser: argparse.ArgumentParser, *, metavar: str = "NAME=DIR",
                 help_: str = "load an adapter (repeat)") -> None:  # fmt: skip
    """``--adapter NAME=DIR``, repeatable; the values are a list in ``args.adapter``.

    Args:
        parser: the command's parser.
        metavar: how the help shows the value (``[NAME=]DIR`` where the name is optional).
        help_: the command's help text.
    """
    parser.add_argument("--adapter", action="append", default=[], metavar=metavar, help=help_)


def add_device(parser: argparse.ArgumentParser, *, default: str = "auto", help_: str = "auto, cpu or cuda") -> None:
    """``--device``.

    Args:
        parser: the command's parser.
        default: the command's default device.
        help_: the command's help text.
    """
    parser.add_argument("--device", default=default, help=help_)


def add_threads(parser: argparse.ArgumentParser, *, default: int | None = None,
                help_: str = "torch CPU threads") -> None:  # fmt: skip
    """``--threads``: torch's CPU thread count.

    Args:
        parser: the command's parser.
        default: the value when not given (None or 0: torch's own choice).
        help_: the command's help text.
    """
    parser.add_argument("--threads", type=int, default=default, help=help_)


def add_json(parser: argparse.ArgumentParser, help_: str = "print JSON instead of a table") -> None:
    """``--json``: machine-readable output on stdout.

    Args:
        parser: the command's parser.
        help_: the command's help text (what the JSON holds).
    """
    parser.add_argument("--json", action="store_true", help=help_)


def add_seed(parser: argparse.ArgumentParser, *, default: int = 0, help_: str | None = None) -> None:
    """``--seed``.

    Args:
        parser: the command's parser.
        default: the seed when not given.
        help_: the command's help text.
    """
    parser.add_argument("--seed", type=int, default=default, help=help_)


def int_list(text: str) -> list[int]:
    """An argparse type: ``"1,4,16"`` → ``[1, 4, 16]``.

    Args:
        text: the flag's value.
    """
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int_list(text: str) -> list[int]:
    """An argparse type: a non-empty ``int_list`` of integers >= 1.

    Args:
        text: the flag's value.
    """
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_config_arguments(parser: argparse.ArgumentParser, only: list[str] | None = None) -> None:
    """One ``--flag`` per TrainConfig field. Defaults are suppressed so only given flags override.

    Args:
        parser: the command's parser.
        only: the fields to declare (None: every field).
    """
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig.field_defaults()
    for f in fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = base_type(hints[f.name])
        help_ = f"{f.metadata.get('help', '')} (default: {defaults[f.name]})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)  # fmt: skip
        else:
            metavar = "LIST" if typing.get_origin(base) is list else f.name.upper()
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_)


def add_config_file(parser: argparse.ArgumentParser,
                    help_: str = "TOML/YAML file of fields; flags override it") -> None:  # fmt: skip
    """``--config FILE``: training settings read before the flags.

    Args:
        parser: the command's parser.
        help_: the command's help text.
    """
    parser.add_argument("--config", metavar="FILE", help=help_)


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column table metric → value (NaN shown as ``nan``).

    Args:
        metrics: the scores to show, in order.
    """
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in metrics.items():
        shown = "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def add_test_file_alias(parser: argparse.ArgumentParser) -> None:
    """``--test-file``: the file scored at the end is the test split, the name data folders suggest.

    Args:
        parser: the command's parser.
    """
    parser.add_argument("--test-file", dest="eval_file", default=argparse.SUPPRESS, metavar="EVAL_FILE",
                        help="same as --eval-file")  # fmt: skip


def adapter_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, folder)`` for each ``--adapter [NAME=]DIR`` value: one unnamed adapter is ``default``, several
    unnamed ones take their folder's name; names are identifiers other than ``base`` and differ.

    Args:
        values: the command's ``--adapter`` values.
    """
    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = ("default" if len(values) == 1 else Path(value).name.replace("-", "_")), value
        if not name.isidentifier() or name == "base":
            raise ConfigError(f"--adapter {value!r}: the name {name!r} must be an identifier other than 'base'")
        specs.append((name, path))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapter names must differ, got {names}; name them NAME=DIR")
    return specs

"""The one rule for adapter ids a server accepts (``--adapter NAME=DIR`` and ``POST /v1/adapters``).

An adapter's name becomes a key of ``nn.ModuleDict``s inside every adapted layer (``LoraLayer.adapters``,
``ModuleCopies.copies``), and lorakit's ``inject`` wants a Python identifier. ``ModuleDict`` refuses a key
that is already one of its attributes (``training``, ``forward``, ``keys``, ...) with a ``KeyError``, so
those names are reserved; a leading underscore is excluded so dunders and private attributes never clash.
"""

from __future__ import annotations

import re

from lorakit.lora.adapters import RESERVED_NAMES

ADAPTER_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_]{0,63}"
_NAME = re.compile(ADAPTER_NAME_PATTERN)


def shown(text: str, limit: int = 80) -> str:
    """``repr(text)``, cut to ``limit`` characters: user input echoed in a message stays short."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[: limit - 3]}...' ({len(text)} characters)"


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an adapter id, or None when it can.

    Args:
        name: the proposed id.
    """
    if not _NAME.fullmatch(name):
        return (f"adapter name {shown(name)} must match {ADAPTER_NAME_PATTERN} (a letter, then up to 63 "
                "letters, digits or underscores)")
    if name in RESERVED_NAMES:
        return f"adapter name {name!r} is reserved (an attribute of torch's ModuleDict); pick another"
    return None

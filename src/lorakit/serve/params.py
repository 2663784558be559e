"""What a generation request may ask for: every field either implemented or refused with a 400 naming it.

OpenAI's schemas have many more fields than this server implements; accepting them silently would serve a
client something other than what it asked for (``logit_bias`` ignored, ``tools`` dropped), so a field the
body models do not declare is refused unless it is null (a client's way of saying "the default").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from lorakit.serve.protocol import APIError

# Fields that change nothing about the answer, so accepting them is honest: an end-user id kept for abuse
# monitoring upstream.
IGNORED_FIELDS = frozenset({"user"})


def refuse_unknown(body: BaseModel, path: str = "") -> None:
    """400 for the first field of ``body`` (or of a nested model) that this server does not implement.

    Args:
        body: a parsed request body (its models allow extra fields so they can be named here).
        path: the field path of ``body`` inside the request, for the message.
    """
    for name, value in (body.model_extra or {}).items():
        if value is not None and name not in IGNORED_FIELDS:
            where = f"{path}{name}"
            raise APIError(400, f"{where}: not supported by this server (send null or leave it out)",
                           param=where)
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                index = f"[{i}]" if isinstance(value, list) else ""
                refuse_unknown(item, f"{path}{name}{index}.")


def refuse_surrogates(value: Any, path: str) -> None:
    """400 when a string anywhere in ``value`` holds a lone UTF-16 surrogate (JSON allows ``"\\ud800"``, but
    such a string is not Unicode text: no tokenizer can encode it).

    Args:
        value: a parsed JSON value (or a body model).
        path: its field name, for the message.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise APIError(400, f"{path}: holds a lone surrogate (such as \\ud800), which is not valid Unicode "
                           "text", param=path)
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_surrogates(key, path)
            refuse_surrogates(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            refuse_surrogates(item, f"{path}[{i}]")

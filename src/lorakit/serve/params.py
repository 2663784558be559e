"""What a generation request may ask for: every field either implemented or refused with a 400 naming it.

OpenAI's schemas have many more fields than this server implements; accepting them silently would serve a
client something other than what it asked for (``logit_bias`` ignored, ``tools`` dropped), so a field the
body models do not declare is refused unless it is null (a client's way of saying "the default").
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lorakit.serve.protocol import APIError, completion_object
from lorakit.serve.sequence import Event, SamplingParams, Sequence
from lorakit.serve.tools import ToolFamily

# OpenAI's bound on a logit_bias value.
MAX_LOGIT_BIAS = 100.0

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


def candidates(body: Any, max_n: int) -> int:
    """How many sequences a request runs: ``best_of`` (completions) or ``n``; 400 for bad pairs.

    Args:
        body: a completions or chat body.
        max_n: the server's bound on both.
    """
    n, best_of = body.n, getattr(body, "best_of", None)
    if n > max_n:
        raise APIError(400, f"n: {n} is above this server's maximum of {max_n}", param="n")
    if best_of is None:
        return n
    if best_of < n or best_of > max_n:
        raise APIError(400, f"best_of: {best_of} must be at least n ({n}) and at most {max_n}", param="best_of")
    if best_of > n and body.stream:
        raise APIError(400, "best_of: above n it cannot be streamed (the best are known only at the end)",
                       param="best_of")
    return best_of


def sampling_controls(body: Any, vocab: int) -> dict[str, Any]:
    """The ``SamplingParams`` fields of top_k, min_p, logit_bias, the penalties and stop_token_ids, checked.

    Args:
        body: a completions or chat body (its numeric bounds already checked by pydantic).
        vocab: the tokenizer's size: every token id must be below it.
    """
    bias = []
    for key, value in (body.logit_bias or {}).items():
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < vocab:
            raise APIError(400, f"logit_bias: the key {key[:20]!r} is not a token id (0..{vocab - 1})",
                           param="logit_bias")
        if not math.isfinite(value) or abs(value) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias: the value for {token} must be within -100..100", param="logit_bias")
        bias.append((token, float(value)))
    stop_ids = body.stop_token_ids or []
    if any(not 0 <= t < vocab for t in stop_ids):
        raise APIError(400, f"stop_token_ids: every id must be within 0..{vocab - 1}", param="stop_token_ids")
    return {"top_k": max(body.top_k or 0, 0), "min_p": body.min_p, "logit_bias": tuple(bias),
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "repetition_penalty": body.repetition_penalty, "stop_token_ids": frozenset(stop_ids)}


def per_choice(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s parameters: a seeded request's choices get seeds seed, seed+1, ... (distinct, and
    reproducible)."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def best(seqs: list[Sequence], n: int) -> list[Sequence]:
    """The ``n`` sequences with the highest log-prob per token (OpenAI's ``best_of``), in submission order
    when all are kept."""
    if len(seqs) == n:
        return seqs
    return sorted(seqs, key=lambda s: s.cumulative_logprob / max(s.completion_tokens, 1), reverse=True)[:n]


@dataclass
class Reply:
    """One request's answer being built: its id, the sequences of its choices and their events."""

    rid: str
    model: str
    chat: bool
    seqs: list[Sequence]
    events: asyncio.Queue[tuple[int, Event]]
    prompt_tokens: int = 0
    tools: ToolFamily | None = None  # parse tool calls out of the text (chat with tools)

    def chunk(self, index: int, text: str, finish: str | None, *, role: bool = False,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """A streamed chunk of choice ``index``."""
        obj = completion_object(self.rid, self.model, text, finish, chat=self.chat, chunk=True, role=role,
                                logprobs=logprobs)
        obj["choices"][0]["index"] = index
        return obj


def check_scale(scale: float, adapter: str | None, config: Any, batching: bool) -> None:
    """400 unless ``lora_scale`` can be honoured: 1, or a plain LoRA adapter in a batching server.

    Args:
        scale: the request's ``lora_scale``.
        adapter: the adapter it picked (None: the base model).
        config: that adapter's ``LoraConfig`` (None for the base).
        batching: whether the engine routes rows (``--no-batching`` switches whole adapters instead).
    """
    if scale == 1.0:
        return
    if adapter is None:
        problem = "the base model has no adapter to scale"
    elif not batching:
        problem = "this server runs without batching (--no-batching), which cannot scale one request's adapter"
    elif getattr(config, "use_dora", False) or getattr(config, "modules_to_save", ()):
        problem = f"adapter {adapter!r} has DoRA magnitudes or modules_to_save copies, which a scale cannot apply to"
    else:
        return
    raise APIError(400, f"lora_scale: {problem}", param="lora_scale")

"""Supervised fine-tuning (SFT) data: prompt/completion or chat records from JSONL, CSV or TSV files.

A record is either ``{"prompt": ..., "completion": ...}`` (the completion follows the prompt verbatim, so
a separator such as a space or newline belongs at the end of the prompt or the start of the completion)
or ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template.
The loss falls on the completion (plus EOS), or on every assistant turn of a chat and never on system or
user text. Every malformed record is a :class:`DataError` naming the file, the line and the problem.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.collate import IGNORE_INDEX
from lorakit.data.splits import carve_valid
from lorakit.data.text import DataError, _records_from_jsonl, _records_from_table

__all__ = [
    "SFT_SUFFIXES",
    "TRUNCATION_RULES",
    "SftRecord",
    "chat_segments",
    "encode_sft",
    "find_sft_file",
    "load_sft",
    "sft_splits",
]

SFT_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv")
TRUNCATION_RULES = ("left", "refuse")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SftRecord:
    """One training conversation. Exactly one of (prompt, completion) and messages is set.

    ``source`` is ``"file, line N"``, used in every later error about the record."""

    source: str
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def reference(self) -> str:
        """The text generation is scored against: the completion, or the last assistant turn."""
        text = self.messages[-1][1] if self.messages is not None else self.completion or ""
        return text.strip()  # generations are stripped too; a leading separator is not content

    @property
    def mr(self) -> str:
        """The input, under the name E2E items give it (the trainer's predictions file reads it)."""
        return self.prompt if self.messages is None else json.dumps([list(m) for m in self.messages[:-1]])

    @property
    def references(self) -> list[str]:
        return [self.reference]

    def key(self) -> str:
        """What the record is conditioned on; splits are carved disjointly by it."""
        if self.messages is not None:
            return json.dumps(self.messages[:-1])
        return self.prompt or ""


def _parse_messages(value: Any, where: str, field: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content', got {msg!r}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}] content must be text, got {type(content).__name__}")
        if role == "system" and i > 0:
            raise DataError(f"{where}: {field}[{i}] is a system message; only the first message may be one")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: {field}[{i}] is an empty assistant message (nothing to learn)")
        out.append((role, content))
    first = next(r for r, _ in out if r != "system") if any(r != "system" for r, _ in out) else None
    if first != "user":
        raise DataError(f"{where}: the first non-system message must be the user's, got {first!r}")
    if out[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (a reply to learn and to score)")
    return tuple(out)


def _parse_record(rec: dict[str, Any], where: str, fields: tuple[str, str, str]) -> SftRecord:
    prompt_f, completion_f, messages_f = fields
    has_messages, has_pair = messages_f in rec, prompt_f in rec or completion_f in rec
    if has_messages and has_pair:
        raise DataError(f"{where}: has both {messages_f!r} and {prompt_f!r}/{completion_f!r}; use one form")
    if has_messages:
        return SftRecord(where, messages=_parse_messages(rec[messages_f], where, messages_f))
    missing = [f for f in (prompt_f, completion_f) if f not in rec]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {missing}; expected {prompt_f!r} + {completion_f!r} or {messages_f!r}"
            f" (present: {sorted(rec)})"
        )
    prompt, completion = rec[prompt_f], rec[completion_f]
    for name, val in ((prompt_f, prompt), (completion_f, completion)):
        if not isinstance(val, str):
            raise DataError(f"{where}: {name!r} must be text, got {type(val).__name__}")
    if not completion.strip():
        raise DataError(f"{where}: empty completion in {completion_f!r} (nothing to learn)")
    return SftRecord(where, prompt=prompt, completion=completion)


def load_sft(
    path: str | Path,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> list[SftRecord]:
    """Read an SFT file (``.jsonl``/``.ndjson``, or ``.csv``/``.tsv`` with a header naming the prompt and
    completion columns; chat records need JSONL).

    Args:
        path: the file.
        prompt_field / completion_field / messages_field: the keys (or columns) holding each part.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fields = (prompt_field, completion_field, messages_field)
    if suffix in (".jsonl", ".ndjson"):
        records = _records_from_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        records = _records_from_table(path, "," if suffix == ".csv" else "\t", [prompt_field, completion_field])
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} for SFT (use .jsonl, .csv or .tsv)")
    out = [_parse_record(rec, f"{path}, line {lineno}", fields) for lineno, rec in records]
    if not out:
        raise DataError(f"{path}: no records (the file is empty)")
    return out


def find_sft_file(folder: Path, stems: Sequence[str]) -> Path | None:
    """The first ``folder/<stem><suffix>`` that exists, stems in order of preference."""
    for stem in stems:
        for suffix in SFT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def sft_splits(
    files: dict[str, Path | None], seed: int, fields: tuple[str, str, str], valid_fraction: float = 0.1
) -> dict[str, list[SftRecord]]:
    """``{"train", "valid", "test"}`` records from the files found for each role.

    A missing valid file is carved out of train (``lorakit.data.splits.carve_valid``: disjoint by prompt, with
    a warning; none when train is too small or ``valid_fraction`` is 0); a missing test file falls back to
    the valid split. Nothing is ever carved out of the test file.

    Args:
        files: role -> file (None when absent); ``train`` is required.
        seed: picks the carved records.
        fields: (prompt_field, completion_field, messages_field).
        valid_fraction: share of train's distinct prompts carved as valid.
    """
    if files.get("train") is None:
        raise DataError("sft: no train file (train.jsonl/.csv/.tsv in --data, or --train-file)")
    train = load_sft(files["train"], *fields)
    if files.get("valid") is not None:
        valid = load_sft(files["valid"], *fields)  # type: ignore[arg-type]
    else:
        carved = carve_valid(train, valid_fraction, seed, task="sft", source=str(files["train"]), key=SftRecord.key)
        train, valid = carved.train, carved.valid
        warnings.warn(carved.note, UserWarning, stacklevel=2)
    test = load_sft(files["test"], *fields) if files.get("test") is not None else valid  # type: ignore[arg-type]
    return {"train": train, "valid": valid, "test": test}


# -- encoding ----------------------------------------------------------------------------------------------
def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def chat_segments(tokenizer: Any, messages: Sequence[tuple[str, str]], source: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_target)`` pieces: each assistant turn's text up to the end
    of that turn in the template (its end-of-turn marker included) is a target; the rest is context.

    Pieces come from rendering growing prefixes of the conversation, so they concatenate to exactly the
    template's rendering of the whole; a template that does not render prefix by prefix is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: chat records need a tokenizer with a chat template; this one has none")
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        head = _render(tokenizer, messages[:k], True)
        full = _render(tokenizer, messages[: k + 1], False)
        if not (head.startswith(done) and full.startswith(head)):
            raise DataError(
                f"{source}: the chat template does not render this conversation prefix by prefix, so its "
                "assistant turns cannot be told apart from the rest"
            )
        pieces += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    return [(text, target) for text, target in pieces if text]


def _pieces(record: SftRecord, tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Token ids per piece. Pieces are tokenized one by one, exactly as generation prompts are."""
    if record.messages is not None:
        texts = chat_segments(tokenizer, record.messages, record.source)
        ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t, _ in texts]
        return [(i, target) for i, (_, target) in zip(ids, texts)]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id: a completion needs an end marker to learn")
    prompt = list(tokenizer(record.prompt, add_special_tokens=False)["input_ids"]) if record.prompt else []
    completion = [*tokenizer(record.completion, add_special_tokens=False)["input_ids"], int(eos)]
    return [(prompt, False), (completion, True)]


def _fit(
    pieces: list[tuple[list[int], bool]], max_length: int, record: SftRecord
) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, tokens cut from the left). Only context before the first target may be cut, and
    one context token always stays (position 0 predicts nothing), so no completion token is ever lost."""
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if target else IGNORE_INDEX for piece, target in pieces for t in piece]
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, labels, 0
    context = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if excess > context - 1:
        raise DataError(
            f"{record.source}: {len(ids)} tokens, and the completion from its first target token on is "
            f"{len(ids) - context}: it cannot fit max_length={max_length} by cutting the prompt; raise "
            "--max-length or shorten the record"
        )
    return ids[excess:], labels[excess:], excess


def encode_sft(
    records: Sequence[SftRecord], tokenizer: Any, max_length: int, truncation: str = "left"
) -> list[dict[str, Any]]:
    """Rows ``input_ids, attention_mask, labels, prompt_length`` (labels -100 off the targets).

    ``prompt_length`` is where the last target begins: generation continues ``input_ids[:prompt_length]``.

    Args:
        records: loaded records.
        tokenizer: a Hugging Face tokenizer (with a chat template for chat records).
        max_length: the longest row, in tokens.
        truncation: ``"left"`` cuts prompt tokens from the left of a row that is too long (a UserWarning
            says how many rows); ``"refuse"`` raises DataError naming the rows instead.
    """
    if truncation not in TRUNCATION_RULES:
        raise DataError(f"truncation must be one of {list(TRUNCATION_RULES)}, got {truncation!r}")
    rows, cut, too_long = [], [], []
    for record in records:
        pieces = _pieces(record, tokenizer)
        if truncation == "refuse" and sum(len(p) for p, _ in pieces) > max_length:
            too_long.append(f"{record.source} ({sum(len(p) for p, _ in pieces)} tokens)")
            continue
        ids, labels, removed = _fit(pieces, max_length, record)
        if removed:
            cut.append(record.source)
        last_target = len(ids) - len(pieces[-1][0]) if pieces[-1][1] else len(ids)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                     "prompt_length": last_target})  # fmt: skip
    if too_long:
        raise DataError(
            f"sft: {len(too_long)} of {len(records)} records exceed max_length={max_length} and truncation "
            f"is 'refuse': {', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}"
        )
    if cut:
        warnings.warn(
            f"sft: cut the prompt of {len(cut)} of {len(records)} records from the left to fit "
            f"max_length={max_length} (first: {cut[0]}); completions are kept whole",
            UserWarning,
            stacklevel=2,
        )
    return rows

"""Supervised fine-tuning (SFT) data: prompt/completion or chat records from JSONL, JSON, CSV/TSV, Parquet or
Arrow files and ``datasets.save_to_disk`` folders (:mod:`lorakit.data.files`), in the formats of
:mod:`lorakit.data.formats` (prompt-completion, Alpaca, ShareGPT, OpenAI messages with tool calls).

A record becomes either a prompt and a completion (the completion follows the prompt verbatim, so a
separator such as a space or newline belongs at the end of the prompt or the start of the completion) or a
list of chat messages, rendered with the tokenizer's chat template.
The loss falls on the completion (plus EOS), or on every assistant turn of a chat and never on system or
user text. Every malformed record is a :class:`DataError` naming the file, the line and the problem.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorakit.data.chat_templates import has_stop_token, render_chat, template_supports_tools
from lorakit.data.collate import IGNORE_INDEX
from lorakit.data.files import RECORD_SUFFIXES, DiskSplit, read_records
from lorakit.data.formats import FORMATS, FieldNames, detect_format, text_content, to_record, tool_calls
from lorakit.data.splits import carve_valid
from lorakit.data.text import DataError

__all__ = [
    "SFT_SUFFIXES",
    "TRUNCATION_RULES",
    "SftRecord",
    "chat_eos_note",
    "chat_segments",
    "encode_sft",
    "expand_references",
    "find_sft_file",
    "group_references",
    "load_sft",
    "sft_splits",
]

SFT_SUFFIXES = RECORD_SUFFIXES
TRUNCATION_RULES = ("left", "refuse")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class SftRecord:
    """One training conversation. Exactly one of (prompt, completion) and messages is set.

    ``source`` is ``"file, line N"``, used in every later error about the record."""

    source: str
    prompt: str | None = None
    completion: str | None = None
    # (role, content), or (role, content, tool calls as JSON) for an assistant turn that calls tools
    messages: tuple[tuple[str, ...], ...] | None = None
    tools: str | None = None  # the tool definitions, as JSON text
    # Scoring only: the other answers of records with the same input, grouped by group_references().
    more_answers: tuple[str, ...] = ()

    @property
    def calls_tools(self) -> bool:
        """Whether a turn calls a tool or returns a tool's result."""
        return any(len(m) > 2 or m[0] == "tool" for m in self.messages or ())

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
        """Every answer generation is scored against: its own, then those of records with the same input."""
        return [self.reference, *(answer.strip() for answer in self.more_answers)]

    def key(self) -> str:
        """What the record is conditioned on; splits are carved disjointly by it."""
        if self.messages is not None:
            return json.dumps(self.messages[:-1])
        return self.prompt or ""


def _message(msg: Any, where: str, i: int) -> tuple[str, ...]:
    """(role, content) or, for an assistant turn that calls tools, (role, content, tool_calls as JSON)."""
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or ("content" not in msg and \
            "tool_calls" not in msg):  # fmt: skip
        raise DataError(f"{where}[{i}] must be an object with 'role' and 'content', got {msg!r}")
    role, calls = msg["role"], msg.get("tool_calls")
    if role not in ROLES:
        raise DataError(f"{where}[{i}] has role {role!r}; expected one of {list(ROLES)}")
    if calls and role != "assistant":
        raise DataError(f"{where}[{i}] is a {role} message with tool_calls; only the assistant calls tools")
    empty_call = calls and msg.get("content") is None  # OpenAI sends null content beside tool calls
    content = "" if empty_call else text_content(msg.get("content"), f"{where}[{i}]", "content")
    if role == "system" and i > 0:
        raise DataError(f"{where}[{i}] is a system message; only the first message may be one")
    if role == "assistant" and not content.strip() and not calls:
        raise DataError(f"{where}[{i}] is an empty assistant message (nothing to learn)")
    if calls:
        return (role, content, json.dumps(tool_calls(calls, f"{where}[{i}]")))
    return (role, content)


def _check_tool_results(out: Sequence[tuple[str, ...]], where: str) -> None:
    """Every tool call answered by a tool message right after it, and no tool message unasked."""
    pending = 0
    for i, msg in enumerate(out):
        if msg[0] == "tool":
            if pending == 0:
                raise DataError(f"{where}[{i}] is a tool result without a matching tool call before it")
            pending -= 1
            continue
        if pending:
            raise DataError(f"{where}[{i}]: {pending} tool call(s) before it have no tool result")
        pending = len(json.loads(msg[2])) if len(msg) > 2 else 0


def _parse_messages(value: Any, where: str, field: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}} objects")
    out = tuple(_message(msg, f"{where}: {field}", i) for i, msg in enumerate(value))
    first = next((m[0] for m in out if m[0] != "system"), None)
    if first != "user":
        raise DataError(f"{where}: the first non-system message must be the user's, got {first!r}")
    _check_tool_results(out, f"{where}: {field}")
    if out[-1][0] != "assistant" or len(out[-1]) > 2:
        raise DataError(f"{where}: the last message must be the assistant's reply (a reply to learn and to score)")
    return out


def _parse_record(rec: dict[str, Any], where: str, fmt: str, names: FieldNames) -> SftRecord:
    parts = to_record(rec, fmt, names, where)
    if "messages" in parts:
        messages = _parse_messages(parts["messages"], where, parts["field"])
        tools = json.dumps(parts["tools"]) if parts["tools"] else None
        return SftRecord(where, messages=messages, tools=tools)
    prompt, completion = parts["prompt"], parts["completion"]
    for name, val in ((names.prompt, prompt), (names.completion, completion)):
        if not isinstance(val, str):
            raise DataError(f"{where}: {name!r} must be text, got {type(val).__name__}")
    if not completion.strip():
        raise DataError(f"{where}: empty completion in {names.completion!r} (nothing to learn)")
    return SftRecord(where, prompt=prompt, completion=completion)


def load_sft(
    path: str | Path | DiskSplit,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    data_format: str = "auto",
    field_map: list[str] | None = None,
    summary: list[str] | None = None,
) -> list[SftRecord]:
    """Read SFT records in any format of :mod:`lorakit.data.formats` from a file of
    :data:`lorakit.data.files.RECORD_SUFFIXES` or a ``save_to_disk`` split.

    Args:
        path: the file, or a :class:`DiskSplit`.
        prompt_field / completion_field / messages_field: the keys (or columns) holding each part.
        data_format: ``auto`` (detected from the first record; a file mixing formats is refused) or a format.
        field_map: ``KEY=NAME`` renames of the format keys (``instruction=question``).
        summary: when given, a one-line summary of what was read is appended.
    """
    source = path if isinstance(path, DiskSplit) else Path(path)
    if data_format not in FORMATS:
        raise DataError(f"format must be one of {list(FORMATS)}, got {data_format!r}")
    names = FieldNames.parse(prompt_field, completion_field, messages_field, field_map)
    out, counts, fmt = [], Counter(), None
    for where, rec in read_records(source):
        found = detect_format(rec, names, where, fmt) if data_format == "auto" else data_format
        if fmt is not None and found != fmt:
            raise DataError(f"{where}: a {found} record in a {fmt} file (first record); one format a file")
        fmt = found
        record = _parse_record(rec, where, fmt, names)
        counts["with tools" if record.tools or record.calls_tools else "chats" if record.messages else "pairs"] += 1
        out.append(record)
    if not out:
        raise DataError(f"{source}: no records (the file is empty)")
    if summary is not None:
        detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        summary.append(f"{source}: {len(out)} records, format {fmt}"
                       f"{' (detected)' if data_format == 'auto' else ''}: {detail}")  # fmt: skip
    return out


def find_sft_file(folder: Path, stems: Sequence[str]) -> Path | None:
    """The first ``folder/<stem><suffix>`` that exists, stems in order of preference."""
    for stem in stems:
        for suffix in SFT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def sft_splits(
    files: dict[str, Path | DiskSplit | None],
    seed: int,
    fields: tuple[str, str, str],
    valid_fraction: float = 0.1,
    data_format: str = "auto",
    field_map: list[str] | None = None,
    notes: list[str] | None = None,
) -> dict[str, list[SftRecord]]:
    """``{"train", "valid", "test"}`` records from the files found for each role.

    A missing valid file is carved out of train (``lorakit.data.splits.carve_valid``: disjoint by prompt, with
    a warning; none when train is too small or ``valid_fraction`` is 0); a missing test file falls back to
    the valid split. Nothing is ever carved out of the test file.

    Args:
        files: role -> file or save_to_disk split (None when absent); ``train`` is required.
        seed: picks the carved records.
        fields: (prompt_field, completion_field, messages_field).
        valid_fraction: share of train's distinct prompts carved as valid.
        data_format / field_map: as for :func:`load_sft`.
        notes: when given, one summary line per file read is appended.
    """
    def load(role: str) -> list[SftRecord]:
        return load_sft(files[role], *fields, data_format=data_format, field_map=field_map, summary=notes)  # type: ignore[arg-type]

    if files.get("train") is None:
        raise DataError("sft: no train file (train.jsonl/.json/.csv/.tsv/.parquet/.arrow in --data, a "
                        "save_to_disk folder, or --train-file)")  # fmt: skip
    train = load("train")
    if files.get("valid") is not None:
        valid = load("valid")
    else:
        carved = carve_valid(train, valid_fraction, seed, task="sft", source=str(files["train"]), key=SftRecord.key)
        train, valid = carved.train, carved.valid
        warnings.warn(carved.note, UserWarning, stacklevel=2)
    test = load("test") if files.get("test") is not None else valid
    return {"train": train, "valid": valid, "test": test}


def _answer(record: SftRecord) -> str | None:
    """The text a record is scored on, when another record's can stand in for it (not a tool call)."""
    if record.messages is None:
        return record.completion
    last = record.messages[-1]
    return last[1] if last[0] == "assistant" and len(last) == 2 else None


def group_references(records: Sequence[SftRecord]) -> list[SftRecord]:
    """One record per distinct input, holding every answer given to it, in first-seen order.

    An eval file that answers one prompt several times is a multi-reference example (as E2E's MRs are):
    generation runs once per input and is scored against all its answers.

    Args:
        records: eval records (tool-calling answers are kept apart, never grouped).
    """
    slots: list[list[SftRecord]] = []
    slot_of: dict[tuple[str, str | None], int] = {}
    for record in records:
        if _answer(record) is None:
            slots.append([record])
            continue
        key = (record.key(), record.tools)
        if key not in slot_of:
            slot_of[key] = len(slots)
            slots.append([])
        slots[slot_of[key]].append(record)
    return [replace(first, more_answers=tuple(_answer(r) or "" for r in rest)) for first, *rest in slots]


def expand_references(records: Sequence[SftRecord]) -> list[SftRecord]:
    """Grouped records back to one record per answer (the teacher-forced loss covers every answer).

    Args:
        records: records from :func:`group_references` (others pass through).
    """
    out: list[SftRecord] = []
    for record in records:
        out.append(replace(record, more_answers=()))
        for answer in record.more_answers:
            if record.messages is None:
                out.append(replace(record, completion=answer, more_answers=()))
            else:
                out.append(replace(record, messages=(*record.messages[:-1], ("assistant", answer)), more_answers=()))
    return out


# -- encoding ----------------------------------------------------------------------------------------------
def _render(tokenizer: Any, record: SftRecord, upto: int, generation_prompt: bool) -> str:
    messages = []
    for m in record.messages[:upto]:  # type: ignore[index]
        msg: dict[str, Any] = {"role": m[0], "content": m[1]}
        if len(m) > 2:
            msg["tool_calls"] = json.loads(m[2])
        messages.append(msg)
    tools = json.loads(record.tools) if record.tools else None
    return render_chat(tokenizer, messages, generation_prompt, record.source, tools)


def _check_tool_support(tokenizer: Any, record: SftRecord) -> None:
    if (record.tools or record.calls_tools) and not template_supports_tools(tokenizer):
        raise DataError(
            f"{record.source}: the record has tools or tool calls, and the chat template does not render "
            "tools; pass --chat-template FILE with a template that does (one reading 'tools' and 'tool_calls')"
        )


def chat_segments(tokenizer: Any, record: SftRecord) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_target)`` pieces: each assistant turn's text up to the end
    of that turn in the template (its end-of-turn marker included) is a target; the rest is context.

    Pieces come from rendering growing prefixes of the conversation, so they concatenate to exactly the
    template's rendering of the whole; a template that does not render prefix by prefix is refused.
    """
    source = record.source
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: chat records need a chat template and this tokenizer has none; pass --chat-template "
            "(chatml, llama-3, mistral, gemma or a Jinja file)"
        )
    _check_tool_support(tokenizer, record)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(record.messages or ()):
        if message[0] != "assistant":
            continue
        head = _render(tokenizer, record, k, True)
        full = _render(tokenizer, record, k + 1, False)
        if not (head.startswith(done) and full.startswith(head)):
            raise DataError(
                f"{source}: the chat template does not render this conversation prefix by prefix, so its "
                "assistant turns cannot be told apart from the rest"
            )
        pieces += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    return [(text, target) for text, target in pieces if text]


def _pieces(record: SftRecord, tokenizer: Any) -> list[tuple[list[int], bool]]:
    """Token ids per piece. Pieces are tokenized one by one, exactly as generation prompts are. A chat whose
    last assistant turn holds no EOS gets one appended (as TRL's SFTTrainer does), else the model never
    learns to stop; ``chat_eos_note`` says so once a run."""
    if record.messages is not None:
        texts = chat_segments(tokenizer, record)
        pieces = [(list(tokenizer(t, add_special_tokens=False)["input_ids"]), target) for t, target in texts]
        if pieces[-1][1] and not has_stop_token(tokenizer, pieces[-1][0]):
            pieces[-1] = ([*pieces[-1][0], int(_eos(tokenizer))], True)
        return pieces
    prompt = list(tokenizer(record.prompt, add_special_tokens=False)["input_ids"]) if record.prompt else []
    completion = [*tokenizer(record.completion, add_special_tokens=False)["input_ids"], int(_eos(tokenizer))]
    return [(prompt, False), (completion, True)]


def _eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id: a completion needs an end marker to learn")
    return int(eos)


def chat_eos_note(tokenizer: Any) -> str | None:
    """A line for the run's notes when the chat template ends an assistant turn without the EOS token (so
    lorakit appends it to each chat's last turn); None when the template's turn already ends with it.

    Args:
        tokenizer: the tokenizer, with the chat template the run trains with.
    """
    probe = SftRecord("the EOS check", messages=(("user", "Hi"), ("assistant", "Hello")))
    try:
        target = "".join(t for t, is_target in chat_segments(tokenizer, probe) if is_target)
    except DataError:
        return None  # the records themselves will raise the template's problem, naming their line
    if has_stop_token(tokenizer, tokenizer(target, add_special_tokens=False)["input_ids"]):
        return None
    return (f"the chat template ends an assistant turn with no EOS ({tokenizer.eos_token!r}), the token "
            "generation stops on; appending it to each chat's last turn, as TRL does")  # fmt: skip


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

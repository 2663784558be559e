"""SFT record shapes: which format a record is in, and its conversion to an :class:`SftRecord`.

Formats (``--format``; ``auto`` detects each file's from its first record and refuses a file that mixes them):

- ``prompt-completion``: ``{"prompt", "completion"}``; the completion follows the prompt verbatim.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``, joined with the Stanford Alpaca prompt as
  axolotl's ``type: alpaca`` does (``ALPACA_PROMPT``; a ``system`` text replaces the preamble line) into a
  prompt-completion record: the loss falls on the output and EOS.
- ``sharegpt``: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}`` with ShareGPT/LLaMA-Factory role
  names (``SHAREGPT_ROLES``); ``function_call`` turns become assistant tool calls, ``observation`` tool results.
- ``messages``: OpenAI chat ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?}``; content given as a
  list of text parts is joined with newlines.

Preference records (``prompt``/``chosen``/``rejected``) are recognised and refused: they need a preference
(DPO) task, which lorakit does not have yet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.text import DataError

__all__ = [
    "ALPACA_PROMPT", "FORMATS", "SHAREGPT_ROLES", "FieldNames", "detect_format", "text_content", "to_record",
    "tool_calls",
]

FORMATS = ("auto", "prompt-completion", "alpaca", "sharegpt", "messages")

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), as axolotl uses them.
ALPACA_PREAMBLE = {
    True: "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    False: "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.",
}
ALPACA_PROMPT = {
    True: "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    False: "{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n",
}

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "model": "assistant", "system": "system", "tool": "tool", "observation": "tool",
    "function_response": "tool", "function_call": "assistant",
}  # fmt: skip
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class FieldNames:
    """The keys each format reads; ``--field-map KEY=NAME`` renames any of them."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    conversations: str = "conversations"
    tools: str = "tools"
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, prompt: str, completion: str, messages: str, field_map: list[str] | None) -> FieldNames:
        """Field names from the config's ``prompt_field`` etc. and ``field_map`` entries ``KEY=NAME``.

        Args:
            prompt / completion / messages: the config's own field settings.
            field_map: overrides such as ``["instruction=question", "output=answer"]``.
        """
        names: dict[str, str] = {"prompt": prompt, "completion": completion, "messages": messages}
        known = [f for f in cls.__dataclass_fields__ if f != "extra"]
        for entry in field_map or []:
            key, sep, value = entry.partition("=")
            if not sep or key.strip() not in known or not value.strip():
                raise DataError(f"--field-map {entry!r}: expected KEY=NAME with KEY one of {known}")
            names[key.strip()] = value.strip()
        return cls(**names)


def detect_format(rec: Mapping[str, Any], names: FieldNames, where: str, expected: str | None = None) -> str:
    """The format of one record, from its keys.

    Args:
        rec: the record.
        names: the field names.
        where: file and line, for the message.
        expected: the file's format so far; a record fitting none is taken as one of it with keys missing.
    """
    keys = set(rec)
    if {"chosen", "rejected"} <= keys:
        raise DataError(
            f"{where}: a preference record (prompt/chosen/rejected) needs a preference (DPO) task, which "
            "lorakit does not have yet; for SFT keep the chosen reply as 'completion' or the last message"
        )
    found = [fmt for fmt, needed in (
        ("messages", {names.messages}), ("sharegpt", {names.conversations}),
        ("alpaca", {names.instruction, names.output}), ("prompt-completion", {names.prompt, names.completion}),
    ) if needed <= keys]  # fmt: skip
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{where}: has the keys of several formats {found}; use one form, or --format")
    if expected is not None:
        return expected
    raise DataError(
        f"{where}: matches no known format (keys found: {sorted(keys)}); expected {names.prompt}+"
        f"{names.completion}, {names.instruction}+{names.output} (alpaca), {names.conversations} (sharegpt) "
        f"or {names.messages}; --field-map renames keys"
    )


def text_content(value: Any, where: str, what: str) -> str:
    """A string, or a list of ``{"type": "text", "text"}`` parts joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = sorted({str(p.get("type")) for p in value} - {"text"})
        if kinds:
            raise DataError(f"{where}: {what} has {kinds} parts; only text parts can be trained")
        return "\n".join(str(p.get("text", "")) for p in value)
    raise DataError(f"{where}: {what} must be text or a list of text parts, got {type(value).__name__}")


def _alpaca(rec: Mapping[str, Any], names: FieldNames, where: str) -> dict[str, str]:
    parts = {}
    for key in ("instruction", "input", "output", "system"):
        value = rec.get(getattr(names, key))
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {getattr(names, key)!r} must be text, got {type(value).__name__}")
        parts[key] = (value or "").strip() if key != "output" else value or ""
    if not parts["instruction"]:
        raise DataError(f"{where}: empty {names.instruction!r}")
    has_input = bool(parts["input"])
    preamble = parts["system"] or ALPACA_PREAMBLE[has_input]
    prompt = ALPACA_PROMPT[has_input].format(preamble=preamble, **parts)
    return {"prompt": prompt, "completion": parts["output"]}


def tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` normalised: ``[{"type": "function", "function": {"name", "arguments": dict}}]``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: tool_calls must be a non-empty list")
    calls = []
    for call in value:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: a tool call needs a function name, got {call!r}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: tool call {fn['name']!r} has arguments that are not JSON") from exc
        out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            out["id"] = str(call["id"])
        calls.append(out)
    return calls


def _sharegpt_turn(turn: Any, where: str) -> dict[str, Any]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise DataError(f"{where}: a ShareGPT turn must be an object with 'from' and 'value', got {turn!r}")
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise DataError(f"{where}: unknown ShareGPT role {turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
    if str(turn["from"]).lower() == "function_call":
        value = turn["value"]
        try:
            call = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: a function_call turn's value is not JSON") from exc
        return {"role": "assistant", "content": "", "tool_calls": tool_calls(call if isinstance(call, list)
                                                                                else [call], where)}
    return {"role": role, "content": turn["value"]}


def _sharegpt(rec: Mapping[str, Any], names: FieldNames, where: str) -> list[dict[str, Any]]:
    turns = rec[names.conversations]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {names.conversations!r} must be a non-empty list of turns")
    messages = [_sharegpt_turn(t, f"{where}, turn {i}") for i, t in enumerate(turns)]
    system = rec.get(names.system)
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _tools(rec: Mapping[str, Any], names: FieldNames, where: str) -> list[dict[str, Any]] | None:
    tools = rec.get(names.tools)
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: {names.tools!r} is text but not JSON") from exc
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: {names.tools!r} must be a list of tool definitions")
    return tools


def to_record(rec: Mapping[str, Any], fmt: str, names: FieldNames, where: str) -> dict[str, Any]:
    """``{"prompt", "completion"}`` or ``{"messages", "tools"}`` (raw, checked later) for one record.

    Args:
        rec: the record.
        fmt: its format (not ``auto``).
        names: the field names.
        where: file and line, for messages.
    """
    if fmt == "alpaca":
        for key in (names.instruction, names.output):
            if key not in rec:
                raise DataError(f"{where}: missing {key!r} for the alpaca format (keys found: {sorted(rec)})")
        return _alpaca(rec, names, where)
    if fmt == "prompt-completion":
        missing = [k for k in (names.prompt, names.completion) if k not in rec]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} (present: {sorted(rec)})")
        return {"prompt": rec[names.prompt], "completion": rec[names.completion]}
    key = names.conversations if fmt == "sharegpt" else names.messages
    if key not in rec:
        raise DataError(f"{where}: missing {key!r} for the {fmt} format (keys found: {sorted(rec)})")
    messages = _sharegpt(rec, names, where) if fmt == "sharegpt" else rec[key]
    return {"messages": messages, "tools": _tools(rec, names, where), "field": key}

"""Tools in chat: definitions rendered by the chat template, the model's calls parsed back into OpenAI's
``message.tool_calls``, and (``tool_choice`` "required" or a named function) a grammar that makes the model
call.

A template's family is recognised by the call syntax it writes; ``TOOL_FAMILIES`` has one entry per family
lorakit registers a template for (``chatml-tools`` in lorakit.data.chat_templates writes Hermes/Qwen-style
``<tool_call>`` JSON).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.data.chat_templates import template_supports_tools
from lorakit.serve.protocol import APIError, ChatBody, ChatMessage
from lorakit.serve.sequence import Event
from lorakit.serve.structured import JSON_OPTIONS

# OpenAI's rule for a function name.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolFamily:
    """How one family of chat templates writes tool calls.

    Args:
        name: the family's name.
        marker: text found in every template of the family (how a template is recognised).
        parse: model output -> (content or None, calls as (name, arguments object)).
        grammar: (JSON schema of one call, one call only) -> a Lark grammar of the output (llguidance's dialect).
    """

    name: str
    marker: str
    parse: Callable[[str], tuple[str | None, list[tuple[str, dict[str, Any]]]]]
    grammar: Callable[[dict[str, Any], bool], str]


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks out of ``text`` (an unclosed last
    block too); a block that is not such an object stays in the content.

    Args:
        text: the model's output.
    """
    calls, kept, last = [], [], 0
    for match in _HERMES_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            continue
        calls.append((call["name"], call.get("arguments", {})))
        kept.append(text[last : match.start()])
        last = match.end()
    content = ("".join(kept) + text[last:]).strip()
    return (content or None) if calls else text, calls


def hermes_grammar(call: dict[str, Any], single: bool) -> str:
    """Lark: one (or, unless ``single``, several newline-separated) ``<tool_call>`` blocks of ``call`` JSON,
    laid out as the ``chatml-tools`` template writes calls."""
    schema = json.dumps({**call, "x-guidance": JSON_OPTIONS})
    start = "start: call\n" if single else 'start: call ("\\n" call)*\n'
    return start + f'call: "<tool_call>\\n" %json {schema} "\\n</tool_call>"\n'


TOOL_FAMILIES: dict[str, ToolFamily] = {
    "hermes": ToolFamily("hermes", "<tool_call>", parse_hermes, hermes_grammar),
}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request does with tools: render them, parse calls back, and maybe force a call.

    Args:
        tools: the definitions for the template (OpenAI's shape).
        family: the template's call syntax.
        forced: a Lark grammar the output must follow (tool_choice "required" or a named function), or None.
    """

    tools: list[dict[str, Any]]
    family: ToolFamily
    forced: str | None = None


def plan(body: ChatBody, tokenizer: Any) -> ToolPlan | None:
    """The request's tool plan (None: no tools, or tool_choice "none"); 400 naming the field at fault.

    Args:
        body: the chat body.
        tokenizer: the server's tokenizer (its chat template decides).
    """
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if not body.tools:
        if choice not in ("none", "auto"):
            raise APIError(400, "tool_choice: only allowed when tools are given", param="tool_choice")
        if body.parallel_tool_calls is False:
            raise APIError(400, "parallel_tool_calls: only allowed when tools are given", param="parallel_tool_calls")
        return None
    tools = _definitions(body)
    named = _named(choice, tools)
    if choice == "none":
        return None
    family = _family(tokenizer)
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format: cannot be combined with tools (the output could not hold a call)",
                       param="response_format")
    if named is None and choice == "auto":
        if body.parallel_tool_calls is False:
            raise APIError(400, "parallel_tool_calls: false needs tool_choice 'required' or a named function "
                           "(then the output is constrained to one call)", param="parallel_tool_calls")
        return ToolPlan(tools, family)
    picked = [t for t in tools if named is None or t["function"]["name"] == named]
    call = {"anyOf": [_call_schema(t["function"]) for t in picked]}
    return ToolPlan(tools, family, family.grammar(call, body.parallel_tool_calls is False or named is not None))


def _definitions(body: ChatBody) -> list[dict[str, Any]]:
    """The tool definitions as the template wants them; 400 for bad or repeated names."""
    seen: set[str] = set()
    for i, tool in enumerate(body.tools or []):
        name = tool.function.name
        if not FUNCTION_NAME.fullmatch(name) or name in seen:
            problem = "is given twice" if name in seen else "must be 1..64 letters, digits, '_' or '-'"
            raise APIError(400, f"tools[{i}].function.name: {name[:64]!r} {problem}", param=f"tools[{i}].function.name")
        seen.add(name)
    return [tool.model_dump(exclude_none=True) for tool in body.tools or []]


def _named(choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """The function a ``tool_choice`` object names (None for the strings); 400 for anything else."""
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise APIError(400, f"tool_choice: {choice[:40]!r} is not one of {', '.join(CHOICES)} or "
                           '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        return None
    function = choice.get("function")
    name = function.get("name") if choice.get("type") == "function" and isinstance(function, dict) else None
    if not isinstance(name, str) or set(choice) != {"type", "function"} or set(function) != {"name"}:
        raise APIError(400, 'tool_choice: expected {"type": "function", "function": {"name": ...}}',
                       param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice: no tool is named {name[:64]!r}", param="tool_choice")
    return name


def _family(tokenizer: Any) -> ToolFamily:
    """The family of the server's chat template; 400 when it does not render tools or writes calls no
    parser of lorakit reads."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not template_supports_tools(tokenizer):
        raise APIError(400, "tools: the model's chat template does not render tools (train the adapter with "
                       "--chat-template chatml-tools, or serve a model whose template does)", param="tools")
    for family in TOOL_FAMILIES.values():
        if family.marker in template:
            return family
    raise APIError(400, "tools: the chat template renders tools, but its call syntax is none lorakit parses "
                   f"({', '.join(f'{f.name}: {f.marker}' for f in TOOL_FAMILIES.values())})", param="tools")


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of ``function``: its name, and arguments its parameters admit."""
    arguments = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def history(messages: list[ChatMessage], rendered: list[dict[str, Any]], tokenizer: Any) -> None:
    """Add the assistant turns' ``tool_calls`` (arguments as objects, as templates write them) and the tool
    turns' ``tool_call_id`` to ``rendered``; 400 where the template cannot render them or arguments are not
    a JSON object.

    Args:
        messages: the request's messages.
        rendered: their dicts for the template (from ``chat_text``), changed in place.
        tokenizer: the server's tokenizer (its chat template decides).
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    for i, (message, out) in enumerate(zip(messages, rendered)):
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
        if not message.tool_calls:
            continue
        if message.role != "assistant" or "tool_calls" not in template:
            problem = ("only assistant turns make tool calls" if message.role != "assistant" else
                       "the model's chat template does not render tool calls")
            raise APIError(400, f"messages[{i}].tool_calls: {problem}", param=f"messages[{i}].tool_calls")
        out["tool_calls"] = [_history_call(call, f"messages[{i}].tool_calls[{j}]")
                             for j, call in enumerate(message.tool_calls)]


def _history_call(call: Any, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments: not a JSON object", param=f"{where}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def openai_calls(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Parsed calls in OpenAI's shape: an id each, arguments as a JSON text.

    Args:
        calls: (name, arguments) pairs from a family's ``parse``.
    """
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
            for name, arguments in calls]


def tool_message(choice: dict[str, Any], family: ToolFamily) -> None:
    """Turn a finished chat choice's text into ``content`` and ``tool_calls`` (finish_reason "tool_calls"
    when the model called and was not cut off).

    Args:
        choice: a chat completion choice (``message`` or a last stream chunk's ``delta``), changed in place.
        family: the template's call syntax.
    """
    key = "message" if "message" in choice else "delta"
    content, calls = family.parse(choice[key].get("content") or "")
    if not calls:
        return
    choice[key]["content"] = content
    choice[key]["tool_calls"] = openai_calls(calls)
    if key == "delta":
        for index, call in enumerate(choice[key]["tool_calls"]):
            call["index"] = index
    if choice["finish_reason"] == "stop":
        choice["finish_reason"] = "tool_calls"


class Held:
    """A streamed choice's events held back until the last, which then carries all the text and log-probs
    (a call can only be parsed from the whole text)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[Any] = []

    def hold(self, ev: Event) -> Event:
        """An empty event until ``ev`` is the last; then the last with everything held so far."""
        self.text.append(ev.text)
        self.logprobs += ev.logprobs
        if not ev.finish_reason or ev.error:
            return Event()
        return dataclasses.replace(ev, text="".join(self.text), logprobs=self.logprobs)

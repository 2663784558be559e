"""`lorakit serve`'s chat ``tools`` (issue 33): definitions rendered by the chat template, calls parsed back
into OpenAI's ``tool_calls``, a forced call (``tool_choice`` "required" or a named function) through the
grammar, and every bad combination a 400 naming its field. The tiny model speaks through the real SmolLM2
tokenizer with lorakit's ``chatml-tools`` template (SmolLM2's own does not render tools).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("fastapi")

from lorakit.data.chat_templates import CHAT_TEMPLATES
from lorakit.serve.tools import parse_hermes
from serve_util import api_error, one_adapter_server, raw

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_tok(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.chat_template = CHAT_TEMPLATES["chatml-tools"]
    return tok


@pytest.fixture(scope="module")
def server(tools_tok, adapter_dir):
    with one_adapter_server(tools_tok, adapter_dir, 512, max_tokens_cap=200) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(tok, adapter_dir):
    """SmolLM2's own chat template, which has no tools."""
    with one_adapter_server(tok, adapter_dir, 512) as srv:
        yield srv


def _chat(url: str, expect: int = 200, **fields) -> dict:
    body = {"model": "a0", "messages": MESSAGES, "max_tokens": 100, "temperature": 0, **fields}
    code, _, answer = raw(url, "POST", "/v1/chat/completions", body)
    assert code == expect, answer
    return answer


# -- the Hermes parser --------------------------------------------------------------------------------------
def test_hermes_parser_reads_calls_and_keeps_the_rest_as_content():
    one = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert parse_hermes(one) == (None, [("f", {"a": 1})])
    two = 'Sure.\n' + one + '\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    assert parse_hermes(two) == ("Sure.", [("f", {"a": 1}), ("g", {})])
    unclosed = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}'
    assert parse_hermes(unclosed) == (None, [("f", {"a": 1})])
    for text in ("just words", "<tool_call>\n{not json}\n</tool_call>", '<tool_call>["f"]</tool_call>',
                 '<tool_call>{"name": "f", "arguments": "a=1"}</tool_call>'):
        assert parse_hermes(text) == (text, [])


# -- rendering ----------------------------------------------------------------------------------------------
def test_tools_reach_the_prompt_through_the_chat_template(server, tools_tok):
    with_tools = _chat(server.url, tools=TOOLS, max_tokens=1)["usage"]["prompt_tokens"]
    without = _chat(server.url, max_tokens=1)["usage"]["prompt_tokens"]
    expected = tools_tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert with_tools == len(tools_tok(expected, add_special_tokens=False).input_ids) > without
    assert "get_weather" in expected


def test_tool_choice_none_renders_no_tools(server):
    none = _chat(server.url, tools=TOOLS, tool_choice="none", max_tokens=1)["usage"]["prompt_tokens"]
    assert none == _chat(server.url, max_tokens=1)["usage"]["prompt_tokens"]


def test_a_template_without_tools_is_a_400_and_none_still_serves(plain_server):
    err = api_error(raw(plain_server.url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}), 400)
    assert err["param"] == "tools" and "does not render tools" in err["message"], err
    _chat(plain_server.url, tools=TOOLS, tool_choice="none", max_tokens=2)


def test_auto_without_a_call_is_plain_content(server):
    choice = _chat(server.url, tools=TOOLS, tool_choice="auto", max_tokens=8)["choices"][0]
    assert "tool_calls" not in choice["message"] and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"


# -- forced calls through the grammar -----------------------------------------------------------------------
def _arguments(call: dict, schema: dict) -> dict:
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, schema)
    return arguments


def test_a_named_function_is_called_with_valid_arguments(server):
    choice = _chat(server.url, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                   max_tokens=150)["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    _arguments(call, WEATHER)
    assert choice["message"]["content"] is None


def test_required_with_one_call_only_calls_one_of_the_tools(server):
    choice = _chat(server.url, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                   max_tokens=150)["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    _arguments(call, schemas[call["function"]["name"]])


def test_a_forced_call_cut_by_max_tokens_is_length_without_calls(server):
    choice = _chat(server.url, tools=TOOLS, tool_choice="required", max_tokens=5)["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith("<tool_call>")


def test_a_streamed_call_arrives_whole_in_the_last_chunk(server):
    code, _, text = raw(server.url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": MESSAGES, "max_tokens": 150, "temperature": 0, "stream": True,
                         "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert code == 200, text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:-1]] == [""]  # the role chunk only
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    (call,) = last["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    _arguments(call, WEATHER)


# -- history with calls and results -------------------------------------------------------------------------
HISTORY = [*MESSAGES,
           {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]


def test_a_history_with_calls_and_results_is_rendered_by_the_template(server, tools_tok):
    answer = _chat(server.url, messages=HISTORY, tools=TOOLS, max_tokens=1)
    rendered = [HISTORY[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
                {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1"}]
    text = tools_tok.apply_chat_template(rendered, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '"arguments": {"city": "Paris"' in text and "<tool_response>" in text
    assert answer["usage"]["prompt_tokens"] == len(tools_tok(text, add_special_tokens=False).input_ids)


def test_history_calls_the_template_cannot_render_are_a_400(plain_server, server):
    err = api_error(raw(plain_server.url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": HISTORY, "max_tokens": 2}), 400)
    assert err["param"] == "messages[1].tool_calls" and "does not render" in err["message"], err
    bad = json.loads(json.dumps(HISTORY))
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    err = api_error(raw(server.url, "POST", "/v1/chat/completions", {"model": "a0", "messages": bad}), 400)
    assert err["param"] == "messages[1].tool_calls[0].function.arguments", err


# -- bad input ----------------------------------------------------------------------------------------------
# fields -> (the param the 400 names, a fragment of its message)
BAD = {
    "unknown choice": ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'sometimes' is not one of"),
    "unknown name": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                     "tool_choice", "no tool is named 'nope'"),
    "choice shape": ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice",
                     "expected {"),
    "required, no tools": ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are given"),
    "twice": ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name", "given twice"),
    "bad name": ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name",
                 "letters, digits"),
    "bad parameters": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
                        "tool_choice": "required"}, "tools", "Invalid type: foo"),
    "with response_format": ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
                             "cannot be combined with tools"),
    "one call, auto": ({"tools": TOOLS, "parallel_tool_calls": False}, "parallel_tool_calls", "needs tool_choice"),
    "not a function": ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "function"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_fields_are_a_400_naming_them(server, case):
    fields, param, fragment = BAD[case]
    err = api_error(raw(server.url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": MESSAGES, "max_tokens": 2, **fields}), 400)
    assert err["param"] == param and fragment in err["message"], err


def test_a_template_whose_call_syntax_no_parser_reads_is_a_400(adapter_dir, smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if tools %}{{ 'Tools: ' + (tools | tojson) + '\\n' }}{% endif %}")
    with one_adapter_server(tok, adapter_dir, 512) as srv:
        err = api_error(raw(srv.url, "POST", "/v1/chat/completions",
                            {"model": "a0", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}), 400)
    assert err["param"] == "tools" and "hermes" in err["message"], err

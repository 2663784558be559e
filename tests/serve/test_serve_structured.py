"""`lorakit serve`'s ``response_format`` (issue 33): constrained decoding through llguidance on the real
SmolLM2 tokenizer. Whatever the (random, tiny) model would say, a finished answer is JSON its schema
accepts; other rows of the batch are untouched; a bad schema is a 400 before the engine sees it.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("fastapi")

from serve_util import Gate, api_error, one_adapter_server, raw, wait_for

# Bounded on every path (enums, a short string, a bounded integer), so even a random model finishes it.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "kind": {"enum": ["pub", "restaurant"]},
                         "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "open": {"type": "boolean"}},
          "required": ["name", "kind", "stars", "open"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a place to eat as JSON."}]


@pytest.fixture(scope="module")
def server(tok, adapter_dir):
    with one_adapter_server(tok, adapter_dir, 256, max_tokens_cap=200) as srv:
        yield srv


def _chat(url: str, **fields) -> dict:
    code, _, body = raw(url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": MESSAGES, "max_tokens": 120, "temperature": 0, **fields})
    assert code == 200, body
    return body


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_unconstrained_output_of_the_tiny_model_is_not_json(server):
    """The baseline the constraint changes: the same request without response_format is no JSON at all."""
    text = _chat(server.url)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_schema_greedy_output_is_complete_valid_json(server, path):
    body = {"model": "a0", "max_tokens": 120, "temperature": 0, "response_format": FORMAT}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "A place to eat:"})
    code, _, answer = raw(server.url, "POST", path, body)
    assert code == 200, answer
    choice = answer["choices"][0]
    text = choice["message"]["content"] if "chat" in path else choice["text"]
    assert choice["finish_reason"] == "stop", choice
    _valid(text, SCHEMA)


def test_json_object_starts_an_object(server):
    """A random model never closes a free-form string (the real model below does); its first token, though,
    can only open an object."""
    choice = _chat(server.url, response_format={"type": "json_object"}, max_tokens=1)["choices"][0]
    assert choice["message"]["content"].startswith("{"), choice


def test_text_format_changes_nothing(server):
    plain = _chat(server.url)["choices"][0]["message"]["content"]
    assert _chat(server.url, response_format={"type": "text"})["choices"][0]["message"]["content"] == plain


def test_max_tokens_before_the_json_completes_is_length(server):
    choice = _chat(server.url, response_format=FORMAT, max_tokens=4)["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])


def test_sampling_controls_compose_with_the_grammar(server, tok):
    """Sampled (seeded, top_k, penalties, n 3) and a +100 logit_bias on a token the grammar never allows
    first: every choice is still valid JSON."""
    banned = tok("Hello", add_special_tokens=False).input_ids[0]
    body = _chat(server.url, response_format=FORMAT, temperature=1.0, seed=7, top_k=50, n=3,
                 frequency_penalty=0.5, logit_bias={str(banned): 100})
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        _valid(choice["message"]["content"], SCHEMA)


def test_streamed_deltas_join_into_valid_json(server):
    code, _, text = raw(server.url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": MESSAGES, "max_tokens": 120, "temperature": 0,
                         "response_format": FORMAT, "stream": True})
    assert code == 200, text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    _valid(joined, SCHEMA)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_constrained_row_leaves_the_other_rows_of_its_batch_alone(server):
    """Same batch (held at a gate, then decoded together): the unconstrained request's text is the one it
    gets alone, and the constrained one is valid JSON."""
    import threading

    alone = _chat(server.url)["choices"][0]["message"]["content"]
    out: dict[str, dict] = {}
    engine = server.engine
    peak = engine.stats["peak_batch"]
    engine.stats["peak_batch"] = 0
    with Gate(engine):
        threads = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, _chat(server.url, **f)))
                   for k, f in (("free", {}), ("json", {"response_format": FORMAT}))]
        for t in threads:
            t.start()
        wait_for(lambda: len(engine.waiting) == 2, 30, "both requests to queue")
    for t in threads:
        t.join(60)
    assert engine.stats["peak_batch"] == 2
    engine.stats["peak_batch"] = max(peak, 2)
    assert out["free"]["choices"][0]["message"]["content"] == alone
    _valid(out["json"]["choices"][0]["message"]["content"], SCHEMA)


def _schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# (response_format, the param the 400 names, a fragment of its message)
BAD_FORMATS = {
    "unknown type": ({"type": "xml"}, "response_format", "'xml' is not one of"),
    "no schema": ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format", "json_schema.schema"),
    "bad name": ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format", "name"),
    "unknown JSON type": (_schema({"type": "foo"}), "response_format", "Invalid type: foo"),
    "bad regex": (_schema({"type": "string", "pattern": "(("}), "response_format", "regex parse error"),
    "unsatisfiable": (_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
                               "required": ["n"]}), "response_format", "nsatisfiable"),
    "false schema": (_schema(False), "response_format", "no text satisfies"),
    "unknown field": ({"type": "json_object", "grammar": "x"}, "response_format.grammar", "not supported"),
}


@pytest.mark.parametrize("field,value", [("stop", ["}"]), ("stop_token_ids", [2])])
def test_stops_that_could_cut_the_json_short_are_a_400(server, field, value):
    err = api_error(raw(server.url, "POST", "/v1/chat/completions",
                        {"model": "a0", "messages": MESSAGES, "response_format": FORMAT, field: value}), 400)
    assert err["param"] == field, err


@pytest.mark.parametrize("case", list(BAD_FORMATS))
def test_a_bad_response_format_is_a_400_before_the_engine_sees_it(server, case):
    """The engine thread is held at a gate: an answer at all proves the check ran on the HTTP side."""
    with Gate(server.engine):
        for path, extra in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
            fmt, param, fragment = BAD_FORMATS[case]
            err = api_error(raw(server.url, "POST", path, {"model": "a0", "response_format": fmt, "max_tokens": 4,
                                                           **extra}, timeout=20), 400)
            assert err["param"] == param and fragment in err["message"], err
            assert len(err["message"].splitlines()) == 1, err
        assert not server.engine.waiting


def test_real_smollm2_answers_a_small_schema_and_json_object(smollm2):
    """The real SmolLM2-135M, greedy: the schema's answer validates, and json_object closes its object."""
    from lorakit.serve.app import ServeSettings, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import BackgroundServer

    model, tok = smollm2
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    app = create_app(Engine(model, tok, max_batch=2), ServeSettings(base_name="smollm2-135m", max_model_len=256))
    with BackgroundServer(app) as srv:
        fields = {"model": "smollm2-135m", "max_tokens": 60,
                  "messages": [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]}
        schema_answer = _chat(srv.url, response_format={"type": "json_schema", "json_schema": {
            "name": "capital", "schema": schema}}, **fields)["choices"][0]
        object_answer = _chat(srv.url, response_format={"type": "json_object"}, **fields)["choices"][0]
    assert schema_answer["finish_reason"] == "stop", schema_answer
    _valid(schema_answer["message"]["content"], schema)
    assert object_answer["finish_reason"] == "stop", object_answer
    assert isinstance(json.loads(object_answer["message"]["content"]), dict)

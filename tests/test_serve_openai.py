"""`lorakit serve` honest for real OpenAI clients (issue 33): cancellation of running sequences, bounded
seeds and clean text, every unimplemented parameter refused with a 400, logprobs and echo.

Servers run on 127.0.0.1 in a thread; every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

pytest.importorskip("fastapi")

from lorakit.serve import adapters_admin
from lorakit.serve.app import ServeSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.server import BackgroundServer
from serve_util import raw, save_random_adapters, tiny_lm, wait_for

PROMPT = "name : Alimentum | area : city centre ||"


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def adapter_dir(tok, tmp_path_factory) -> str:
    return save_random_adapters(lambda: tiny_lm(tok), ["a0"], tmp_path_factory.mktemp("adapters"))["a0"]


def _server(tok, adapter_dir: str, **settings) -> BackgroundServer:
    model = tiny_lm(tok)
    adapters_admin.load(model, "a0", adapter_dir, "causal-lm")
    engine = Engine(model, tok, max_batch=4, max_queue=8)
    srv = BackgroundServer(create_app(engine, ServeSettings(base_name="tiny", max_model_len=200, **settings)))
    srv.engine = engine
    return srv


@pytest.fixture(scope="module")
def server(tok, adapter_dir):
    with _server(tok, adapter_dir) as srv:
        yield srv


def _error(answer, status: int) -> dict:
    code, _, body = answer
    assert code == status, body
    return body["error"]


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    code, _, answer = raw(url, "POST", path, body)
    return code, answer


# -- cancellation of a running sequence -----------------------------------------------------------------
def _send_and_hold(url: str, body: dict) -> socket.socket:
    """Send a request and keep the connection open without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_running_sequence_within_a_step(tok, adapter_dir, stream):
    with _server(tok, adapter_dir) as srv:
        engine = srv.engine
        step = engine._decode

        def slow_step() -> None:  # tokens keep flowing, one every 20 ms: never 0.25 s of quiet
            time.sleep(0.02)
            step()

        engine._decode = slow_step
        sock = _send_and_hold(srv.url, {"model": "a0", "prompt": PROMPT, "max_tokens": 180, "temperature": 0,
                                        "stream": stream})
        wait_for(lambda: engine.active and engine.active[0].completion_tokens >= 5, 30, "the sequence to run")
        seq = engine.active[0]
        at_hangup = seq.completion_tokens
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        wait_for(lambda: seq.done, 30, "the sequence to end")
        assert seq.finish_reason == "cancelled"
        # One step may be under way when the hang-up lands, and one more may start before the flag is read.
        assert seq.completion_tokens <= at_hangup + 2, (at_hangup, seq.completion_tokens)
        wait_for(lambda: not engine.active, 30, "the batch to empty")


# -- bounded seeds, Unicode text, and every unimplemented field refused -------------------------------------
def test_a_seed_outside_int64_is_a_400_and_int64_bounds_are_served(server):
    for seed in (2**64, 2**63, -(2**63) - 1):
        err = _error(raw(server.url, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "seed": seed}), 400)
        assert err["param"] == "seed", err
    for seed in (2**63 - 1, -(2**63)):
        code, _, body = raw(server.url, "POST", "/v1/completions",
                            {"model": "tiny", "prompt": "hi", "seed": seed, "max_tokens": 2})
        assert code == 200, body


def _raw_json(url: str, path: str, text: str) -> tuple[int, dict]:
    """POST a JSON text as is (json.dumps cannot write a lone surrogate the way a client can)."""
    code, _, body = raw(url, "POST", path, text.encode())
    return code, body


@pytest.mark.parametrize("path,text,param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a \\ud800 b"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["\\udfff"]}', "prompt[0]"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800"}]}',
     "messages[0].content"),
])
def test_a_lone_surrogate_in_text_is_a_400(server, path, text, param):
    code, body = _raw_json(server.url, path, text)
    assert code == 400, body
    assert body["error"]["param"] == param and "surrogate" in body["error"]["message"]


# OpenAI's completions and chat fields this server does not implement (each with a value a client would send).
UNIMPLEMENTED = {
    "/v1/completions": {"suffix": "x", "best_of": 2, "logit_bias": {"50256": -100}, "presence_penalty": 0.5,
                        "frequency_penalty": 0.5, "stream_options.bogus": 1},
    "/v1/chat/completions": {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
                             "response_format": {"type": "json_object"}, "parallel_tool_calls": True,
                             "functions": [{"name": "f"}], "function_call": "auto", "logit_bias": {"1": 5},
                             "presence_penalty": 1.0, "frequency_penalty": 1.0, "modalities": ["text"],
                             "audio": {"voice": "x"}, "prediction": {"type": "content", "content": "x"},
                             "reasoning_effort": "low", "service_tier": "auto", "store": True,
                             "metadata": {"a": "b"}, "web_search_options": {}, "messages[0].name": "bob",
                             "messages[0].tool_calls": []},
}


def _with(body: dict, dotted: str, value) -> dict:
    """``body`` with ``value`` set at a dotted path (``messages[0].name``, ``stream_options.bogus``)."""
    body = json.loads(json.dumps(body))
    *parents, leaf = dotted.split(".")
    node = body
    for part in parents:
        name, _, index = part.partition("[")
        node = node.setdefault(name, {}) if not index else node[name][int(index[:-1])]
    node[leaf] = value
    return body


@pytest.mark.parametrize("path,field", [(p, f) for p, fields in UNIMPLEMENTED.items() for f in fields])
def test_every_unimplemented_field_is_a_400_naming_it_and_null_is_the_default(server, path, field):
    base = ({"model": "tiny", "prompt": "hi", "max_tokens": 2} if path == "/v1/completions" else
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    if field.startswith("stream_options"):
        base["stream_options"] = {"include_usage": True}
        base["stream"] = True
    err = _error(raw(server.url, "POST", path, _with(base, field, UNIMPLEMENTED[path][field])), 400)
    assert err["param"] == field and "not supported" in err["message"], err
    code, _, answer = raw(server.url, "POST", path, _with({**base, "stream": False}, field.split(".")[-1]
                                                          if "." not in field else field, None))
    assert code == 200, answer


def test_user_is_accepted_it_changes_nothing(server):
    code, _, body = raw(server.url, "POST", "/v1/completions",
                        {"model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "someone"})
    assert code == 200, body

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

"""`lorakit serve` against hostile and unlucky requests (issue 29): body caps, bounded shutdown, what /health
and the docs routes show without the key, chat roles, adapter names, start-up options, untrained
classifier heads, deeply nested adapter configs, and the wording of body errors.

Servers run on 127.0.0.1 (in a thread, or as a real `lorakit serve` subprocess); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from lorakit import LoraConfig, inject, save_adapter
from lorakit.cli.serve import _parse
from lorakit.errors import LorakitError
from lorakit.serve.app import ServeSettings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.server import BackgroundServer, _free_port, make_app
from serve_util import api_error, one_adapter_server, raw, tiny_lm, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory) -> str:
    """A tiny Llama with SmolLM2's tokenizer, saved as a model folder `lorakit serve --model` can load."""
    folder = tmp_path_factory.mktemp("base")
    tiny_lm(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _server(tok, adapter_dir: str, **settings) -> BackgroundServer:
    return one_adapter_server(tok, adapter_dir, 160, **settings)


@pytest.fixture(scope="module")
def server(tok, adapter_dir):
    with _server(tok, adapter_dir) as srv:
        yield srv


_error = api_error


# -- item 3: one large request cannot freeze the server --------------------------------------------------
def _post_raw(url: str, head: bytes, body_chunks, timeout: float = 30) -> bytes:
    """Send a request by hand (the body may be cut off by the server: a closed pipe is fine), return the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered 413 and closed while we were still sending
            pass
        reply = b""
        try:
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except OSError:
            pass
        return reply


def _health_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        assert raw(url, "GET", "/health", timeout=30)[0] == 200
        out.append(time.perf_counter() - t)
        time.sleep(0.02)


def test_a_huge_body_is_refused_at_once_while_health_keeps_answering(server):
    latencies: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=_health_latencies, args=(server.url, stop, latencies))
    poller.start()
    try:
        body = b'{"model": "a0", "prompt": "' + b"word " * (4 << 20) + b'"}'  # 20 MiB
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        t = time.perf_counter()
        reply = _post_raw(server.url, head, [body])
        declared_s = time.perf_counter() - t
        # No Content-Length (chunked): the body is cut off once it passes the cap.
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
               b"Transfer-Encoding: chunked\r\n\r\n"
        piece = b"x" * 65536
        chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(64))  # 4 MiB
        chunked = _post_raw(server.url, head, chunks)
    finally:
        stop.set()
        poller.join(60)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_too_large" and str(1 << 20) in error["message"]
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
    assert declared_s < 10
    assert latencies and max(latencies) < 2.0, max(latencies)
    assert raw(server.url, "GET", "/health")[0] == 200


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenising(tok, adapter_dir):
    with _server(tok, adapter_dir, max_request_bytes=16 << 20) as srv:
        calls: list[int] = []
        real = tok.__class__.__call__

        def spy(self, text, *args, **kwargs):
            calls.append(len(text) if isinstance(text, str) else -1)
            return real(self, text, *args, **kwargs)

        tok.__class__.__call__ = spy
        try:
            err = _error(raw(srv.url, "POST", "/v1/completions", {"model": "a0", "prompt": "word " * 2_000_000}), 400)
            chat = {"model": "a0", "messages": [{"role": "user", "content": "word " * 2_000_000}]}
            chat_err = _error(raw(srv.url, "POST", "/v1/chat/completions", chat), 400)
            fits = raw(srv.url, "POST", "/v1/completions", {"model": "a0", "prompt": "word " * 10, "max_tokens": 2})
        finally:
            tok.__class__.__call__ = real
        assert err["code"] == chat_err["code"] == "context_length_exceeded"
        assert "10000000 characters" in err["message"]
        assert fits[0] == 200
        assert calls == [50]  # only the prompt that fits was tokenised


# -- item 4: shutdown is bounded, a second signal forces it ----------------------------------------------
def _start(base_dir: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LORAKIT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", base_dir, "--port", str(port),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            return raw(url, "GET", "/health", timeout=5)[0] == 200
        except OSError:
            return False

    wait_for(up, 120, "the server to start")
    return proc, url


def _half_sent(url: str) -> socket.socket:
    """A request whose headers promise 1000 body bytes of which 10 were sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    return sock


def _reply(sock: socket.socket) -> bytes:
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except OSError:
        pass
    sock.close()
    return out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_shutdown_with_a_half_sent_request_ends_after_the_timeout_with_a_503(base_dir):
    proc, url = _start(base_dir, "--shutdown-timeout", "2")
    try:
        sock = _half_sent(url)
        time.sleep(0.5)  # the request is in the app, waiting for the rest of its body
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        reply = _reply(sock)
        proc.wait(30)
        took = time.monotonic() - t
    finally:
        _stop(proc)
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "server_error"
    assert 1.5 < took < 20, took


def test_a_second_signal_forces_the_exit_with_a_503_for_the_open_request(base_dir):
    proc, url = _start(base_dir, "--shutdown-timeout", "300")
    try:
        sock = _half_sent(url)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert proc.poll() is None  # the first signal waits for the open request
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        reply = _reply(sock)
        proc.wait(30)
        took = time.monotonic() - t
    finally:
        _stop(proc)
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert took < 15, took


def test_a_forced_shutdown_fails_running_and_queued_requests_with_a_503(tok, adapter_dir):
    from serve_util import Gate

    model = tiny_lm(tok)
    engine = Engine(model, tok, max_batch=1, max_queue=8)
    with BackgroundServer(create_app(engine, ServeSettings(base_name="tiny", max_model_len=160))) as srv:
        answers: dict[str, tuple] = {}
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 100}
        clients = [threading.Thread(target=lambda k=k, extra=extra: answers.__setitem__(
            k, raw(srv.url, "POST", "/v1/completions", {**body, **extra}))) for k, extra in
            (("plain", {}), ("stream", {"stream": True}))]
        with Gate(engine):  # the engine is busy (as in a long step): both requests are accepted, neither runs
            for client in clients:
                client.start()
            wait_for(lambda: len(engine.waiting) == 2, 30, "both requests to queue")
            srv.server.config.app.state.abort()  # what the shutdown's watchdog calls
            for client in clients:  # answered while the engine is still busy
                client.join(30)
        # Their handlers cancelled them: the engine drops both at its next boundary, none is decoded.
        wait_for(lambda: engine.stats["cancelled"] + engine.stats["error"] == 2, 30, "the engine to drop both")
        assert not engine.waiting and not engine.active and engine.stats["length"] == 0
    assert answers["plain"][0] == 503 and answers["plain"][2]["error"]["type"] == "server_error"
    lines = [ln for ln in answers["stream"][2].splitlines() if ln.startswith("data: ")]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == "the server is shutting down"
    assert lines[-1] == "data: [DONE]"


# -- items 5 and 6: what the key protects ----------------------------------------------------------------
def test_with_a_key_health_says_only_up_and_docs_are_off(tok, adapter_dir, server):
    with _server(tok, adapter_dir, api_key="s3cret") as srv:
        assert raw(srv.url, "GET", "/health")[2] == {"status": "ok"}
        full = raw(srv.url, "GET", "/health", headers={"Authorization": "Bearer s3cret"})[2]
        assert full["adapters"] == ["a0"]
        for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
            assert raw(srv.url, "GET", path)[0] == 404, path
    for path in ("/docs", "/openapi.json", "/redoc"):  # off without a key too
        assert raw(server.url, "GET", path)[0] == 404, path
    assert raw(server.url, "GET", "/health")[2]["adapters"] == ["a0"]  # no key: nothing to hide


def test_an_empty_api_key_is_refused_at_start(base_dir, monkeypatch, capsys):
    from lorakit.cli import main

    for key in ("", "  "):
        with pytest.raises(LorakitError, match="empty"):
            make_app(_parse(["--model", base_dir, "--api-key", key]))
    monkeypatch.setenv("LORAKIT_API_KEY", "")
    assert main(["serve", "--model", base_dir]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LORAKIT_API_KEY is empty" in err
    with pytest.raises(ValueError):
        create_app(None, ServeSettings(base_name="x", api_key=""))  # type: ignore[arg-type]


# -- item 7: roles -----------------------------------------------------------------------------------------
def test_chat_roles_are_an_enum(server):
    for role in ("system\n<|im_start|>assistant", "developer", "User", ""):
        body = {"model": "a0", "messages": [{"role": role, "content": "hi"}], "max_tokens": 2}
        err = _error(raw(server.url, "POST", "/v1/chat/completions", body), 400)
        assert err["param"] == "messages.0.role" and "'tool'" in err["message"]
    for role in ("system", "user"):
        body = {"model": "a0", "messages": [{"role": role, "content": "hi"}], "max_tokens": 2}
        assert raw(server.url, "POST", "/v1/chat/completions", body)[0] == 200


# -- item 8: adapter names -----------------------------------------------------------------------------------
def test_adapter_names_follow_one_pattern(server, adapter_dir, base_dir):
    from lorakit.serve.names import RESERVED_NAMES

    assert {"training", "forward", "keys", "state_dict"} <= RESERVED_NAMES
    for name in ("training", "forward", "__class__", "keys", "_modules", "a.b", "with-dash", "9lives", "x" * 65,
                 "x" * 100_000, ""):
        err = _error(raw(server.url, "POST", "/v1/adapters", {"name": name, "path": adapter_dir}), 400)
        assert err["param"] == "name" and len(err["message"]) < 300, err
    ok = raw(server.url, "POST", "/v1/adapters", {"name": "Ok_" + "x" * 61, "path": adapter_dir})
    assert ok[0] == 200, ok
    assert raw(server.url, "DELETE", "/v1/adapters/Ok_" + "x" * 61)[0] == 200
    err = _error(raw(server.url, "POST", "/v1/completions", {"model": "m" * 100_000, "prompt": "hi"}), 404)
    assert len(err["message"]) < 300  # an unknown id is echoed cut short
    for name in ("training", "a.b"):
        with pytest.raises(LorakitError, match=f"--adapter '{name}="):
            make_app(_parse(["--model", base_dir, "--adapter", f"{name}={adapter_dir}"]))


# -- item 9: start-up options ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch 0: must be at least 1"),
    (["--max-queue", "-1"], "--max-queue -1: must be at least 1"),
    (["--max-prefill-tokens", "0"], "--max-prefill-tokens 0: must be at least 1"),
    (["--max-tokens-cap", "0"], "--max-tokens-cap 0"),
    (["--max-model-len", "1"], "--max-model-len 1"),
    (["--max-model-len", "100000"], "the model has only 256 positions"),
    (["--threads", "0"], "--threads 0"),
    (["--port", "70000"], "--port 70000"),
    (["--max-request-bytes", "10"], "--max-request-bytes 10"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout nan"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout -1"),
    (["--adapter", "a=X", "--adapter", "a=Y"], "--adapter a: given twice (X and Y)"),
    (["--adapter", "a"], "expected NAME=DIR"),
])
def test_bad_start_up_options_are_one_line(base_dir, argv, message, capsys):
    from lorakit.cli import main

    with pytest.raises(LorakitError) as caught:
        make_app(_parse(["--model", base_dir, *argv]))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if "--max-model-len" not in argv:  # refused before the model loads, so main returns at once
        assert main(["serve", "--model", base_dir, *argv]) == 1
        assert capsys.readouterr().err.startswith("lorakit serve: error: ")


# -- item 10: no answers from an untrained classifier head --------------------------------------------------
@pytest.fixture(scope="module")
def minilm_adapters(tmp_path_factory) -> dict[str, str]:
    from lorakit.io.models import load_model

    folder, out = tmp_path_factory.mktemp("cls"), {}
    for name, saved in (("headed", ("classifier",)), ("headless", ())):
        model, _ = load_model("minilm-l6", task="seq-cls", num_labels=2)
        inject(model, LoraConfig(targets=("query", "value"), r=2, modules_to_save=saved), name)
        out[name] = str(save_adapter(model, folder / name, name))
    return out


def test_a_classifier_never_answers_through_an_untrained_head(minilm_adapters):
    with pytest.raises(LorakitError, match="carries no trained classifier"):
        make_app(_parse(["--model", "minilm-l6", "--task", "seq-cls", "--adapter", f"h={minilm_adapters['headless']}"]))
    app = make_app(_parse(["--model", "minilm-l6", "--task", "seq-cls", "--adapter",
                           f"h={minilm_adapters['headed']}"]))
    with BackgroundServer(app) as srv:
        err = _error(raw(srv.url, "POST", "/v1/classify", {"model": "minilm-l6", "input": "fine"}), 400)
        assert "no trained classifier head" in err["message"]
        _error(raw(srv.url, "POST", "/v1/classify", {"model": ["h", "minilm-l6"], "input": ["a", "b"]}), 400)
        assert raw(srv.url, "POST", "/v1/classify", {"model": "h", "input": "fine"})[0] == 200
        err = _error(raw(srv.url, "POST", "/v1/adapters", {"name": "nohead", "path": minilm_adapters["headless"]}),
                     400)
        assert "carries no trained classifier" in err["message"]


# -- item 12 (server half): a config nested 100,000 levels deep ----------------------------------------------
def test_a_deeply_nested_adapter_config_is_a_400(server, adapter_dir, tmp_path, base_dir):
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    (deep / "adapter_model.safetensors").write_bytes((Path(adapter_dir) / "adapter_model.safetensors").read_bytes())
    err = _error(raw(server.url, "POST", "/v1/adapters", {"name": "deep", "path": str(deep)}), 400)
    assert "nested more than 64 levels deep" in err["message"]
    with pytest.raises(LorakitError, match="nested more than 64 levels deep"):
        make_app(_parse(["--model", base_dir, "--adapter", f"deep={deep}"]))
    assert raw(server.url, "GET", "/health")[2]["status"] == "ok"


# -- item 14: error wording -----------------------------------------------------------------------------------
def test_body_errors_name_the_right_thing(server):
    err = _error(raw(server.url, "POST", "/v1/completions", b'{"model": "a0", "prompt": '), 400)
    assert err["param"] is None and "not valid JSON" in err["message"] and "character 26" in err["message"]
    body = {"model": "a0", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    err = _error(raw(server.url, "POST", "/v1/chat/completions", body), 400)
    assert err["message"].count("messages") == 1 and err["param"] == "messages"

"""Helpers for the serve tests: tiny models with the real tokenizers, adapters, raw HTTP, a bounded waiter."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

import lorakit
from tiny import bert_config, llama_config, randomize_lora


def tiny_lm(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama over the real SmolLM2 vocabulary, so prompts and chat templates are real text."""
    torch.manual_seed(seed)
    cfg = llama_config(vocab_size=len(tokenizer), max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def tiny_classifier(tokenizer, seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = bert_config(vocab_size=len(tokenizer), max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def add_random_adapters(model, names: list[str], *, std: float = 0.3, **config) -> None:
    """Inject and randomise one adapter per name (seeded by position), leaving none active."""
    config = {"r": 4, "alpha": 8, "targets": ("q", "v"), **config}
    for i, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(**config), name)
        randomize_lora(model, std=std, seed=100 + i)  # only `name`'s parameters are trainable now
    lorakit.set_adapter(model, None)


def save_random_adapters(make_model: Callable[[], torch.nn.Module], names: list[str], folder: Path,
                         **config) -> dict[str, str]:
    """Adapters as files: {name: directory}."""
    model = make_model()
    add_random_adapters(model, names, **config)
    out = {}
    for name in names:
        out[name] = str(lorakit.save_adapter(model, folder / name, name))
    return out


def greedy_reference(model, adapter: str | None, ids: list[int], max_new: int) -> list[int]:
    """Greedy tokens by transformers' generate with ``adapter`` switched in: what the server must match."""
    lorakit.set_adapter(model, adapter)
    try:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                             pad_token_id=model.config.pad_token_id)
    finally:
        lorakit.set_adapter(model, None)
    return out[0, len(ids):].tolist()


def raw(url: str, method: str, path: str, body: bytes | dict | None = None,
        headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], dict | str]:
    """One raw HTTP request: (status, headers, JSON or text body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            parsed: dict | str = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
    finally:
        conn.close()


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Gate:
    """Holds the engine thread between two steps until released: makes queue and timing tests deterministic."""

    def __init__(self, engine) -> None:
        self.release_event = threading.Event()
        self.entered = threading.Event()
        self.engine = engine

    def __enter__(self) -> Gate:
        def hold() -> None:
            self.entered.set()
            self.release_event.wait(30)

        self.engine.call(hold)
        assert self.entered.wait(30), "engine never reached the gate"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_event.set()


def one_adapter_server(tok, adapter_dir: str, max_model_len: int, **settings):
    """A tiny Llama serving adapter ``a0`` from ``adapter_dir`` on 127.0.0.1 (``with`` starts it); its engine
    is ``srv.engine``."""
    from lorakit.serve import adapters_admin
    from lorakit.serve.app import ServeSettings, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import BackgroundServer

    model = tiny_lm(tok)
    adapters_admin.load(model, "a0", adapter_dir, "causal-lm")
    engine = Engine(model, tok, max_batch=4, max_queue=8)
    srv = BackgroundServer(create_app(engine, ServeSettings(base_name="tiny", max_model_len=max_model_len,
                                                            **settings)))  # fmt: skip
    srv.engine = engine
    return srv


def api_error(answer, status: int) -> dict:
    """The ``error`` object of a ``raw`` answer, after checking its status."""
    code, _, body = answer
    assert code == status, body
    return body["error"]


@contextlib.contextmanager
def sse_server(events: list[str]) -> Iterator[tuple[int, list[dict]]]:
    """A server on 127.0.0.1 answering every POST with ``events`` (each one ``data: ...`` line) as a
    server-sent event stream; yields (its port, the JSON bodies it received). Stopped on exit."""
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for event in events:
                self.wfile.write(f"{event}\n\n".encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port, bodies
    finally:
        server.shutdown()
        thread.join(10)

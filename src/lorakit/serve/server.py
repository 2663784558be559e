"""`lorakit serve`: load a base model and adapters, then run the app on uvicorn.

Also ``BackgroundServer``: the same server on a free loopback port in a thread, for tests and the bench.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from typing import Any

from lorakit.errors import LorakitError


def build(model_name: str, adapters: dict[str, str], *, task: str = "causal-lm", **engine_kwargs: Any):
    """(engine, base tokenizer) for a built-in name or folder with ``adapters`` ({name: dir}) loaded.

    Args:
        model_name: ``lorakit.io.models`` name or local folder.
        adapters: adapter ids and their directories.
        task: "causal-lm" or "seq-cls" (the head size comes from the first adapter's saved head).
        engine_kwargs: passed to ``Engine`` (max_batch, max_queue, batching).
    """
    from lorakit.data.chat_templates import apply_chat_template, saved_chat_template
    from lorakit.io.files import read_adapter
    from lorakit.io.models import load_model
    from lorakit.serve import adapters_admin
    from lorakit.serve.engine import Engine
    from lorakit.serve.protocol import APIError

    kwargs: dict[str, Any] = {}
    if task == "seq-cls" and adapters:
        heads = [s["weight"] for s in read_adapter(next(iter(adapters.values()))).saved_modules.values()
                 if "weight" in s]
        if heads:
            kwargs["num_labels"] = heads[-1].shape[0]
    model, tokenizer = load_model(model_name, task=task, **kwargs)
    # /v1/chat/completions renders with the template the adapters were trained with (--chat-template)
    apply_chat_template(tokenizer, saved_chat_template(list(adapters.values())))
    model.eval()
    for name, path in adapters.items():
        try:
            adapters_admin.load(model, name, path, task)
        except APIError as exc:
            raise LorakitError(f"--adapter {name}={path}: {exc.message}") from exc
    return Engine(model, tokenizer, **engine_kwargs), tokenizer


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lorakit serve", description="An OpenAI-compatible server for one base "
                                "model and many LoRA adapters, with continuous mixed-adapter batching.")
    p.add_argument("--model", required=True, help="built-in name (smollm2-135m, minilm-l6) or local folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="load an adapter (repeat)")
    p.add_argument("--task", default="causal-lm", choices=("causal-lm", "seq-cls"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $LORAKIT_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="most waiting requests; more get 429")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens accepted")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit "
                   "(default: the model's position limit, at most 4096)")
    p.add_argument("--no-batching", action="store_true", help="one request at a time (benchmark baseline)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def _adapter_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"--adapter {item!r}: expected NAME=DIR")
        out[name] = path
    return out


def make_app(args: argparse.Namespace):
    """The FastAPI app ``lorakit serve`` would run for these parsed arguments."""
    from lorakit.serve.app import ServeSettings, create_app

    engine, _ = build(args.model, _adapter_args(args.adapter), task=args.task, max_batch=args.max_batch,
                      max_queue=args.max_queue, batching=not args.no_batching)
    limit = getattr(engine.model.config, "max_position_embeddings", None) or 4096
    settings = ServeSettings(base_name=args.model, task=args.task, api_key=args.api_key,
                             max_tokens_cap=args.max_tokens_cap, max_model_len=args.max_model_len or min(limit, 4096))
    return create_app(engine, settings)


def serve_main(argv: list[str]) -> int:
    args = _parse(argv)
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    app = make_app(args)
    key = " (API key required)" if args.api_key else ""
    print(f"lorakit serve: {args.model} with {app.state.engine.adapters()} on http://{args.host}:{args.port}{key}",
          flush=True)
    # SIGINT/SIGTERM: uvicorn stops accepting, waits for open requests, then the lifespan drains the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    return 0


class BackgroundServer:
    """Run an app on 127.0.0.1 in a daemon thread (tests, bench); ``with`` starts and stops it.

    Args:
        app: the ASGI app.
        port: 0 picks a free port.
        start_timeout_s: how long to wait for the socket to accept.
    """

    def __init__(self, app: Any, port: int = 0, start_timeout_s: float = 60.0) -> None:
        import uvicorn

        self.port = port or _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorakit-serve-http", daemon=True)
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: open requests finish, then the engine drains and stops."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


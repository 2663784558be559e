"""The server behind `lorakit serve` (``lorakit.cli.serve``): load a base model and adapters, build the app.

Also ``BackgroundServer``: the same server on a free loopback port in a thread, for tests and the bench.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io.bases import base_for


def build(model_name: str, adapters: dict[str, str], *, task: str = "causal-lm", pack: bool = False,
          **engine_kwargs: Any):
    """(engine, base tokenizer, untrained heads) for a built-in name or folder with ``adapters`` ({name: dir})
    loaded. The untrained heads are a classifier's head modules no checkpoint held (random weights).

    Args:
        model_name: ``lorakit.io.models`` name or local folder.
        adapters: adapter ids and their directories.
        task: "causal-lm" or "seq-cls" (the head size comes from the first adapter's saved head).
        pack: multiply the frozen fp32 linears through oneDNN-packed copies of their weights
            (``lorakit.lora.packed``): faster decoding for one more copy of those weights in memory.
        engine_kwargs: passed to ``Engine`` (max_batch, max_queue, batching, max_prefill_tokens).
    """
    from lorakit.data.chat_templates import apply_chat_template, saved_chat_template
    from lorakit.io.files import read_adapter
    from lorakit.io.models import load_model
    from lorakit.lora.packed import pack_linears
    from lorakit.serve.engine import Engine

    kwargs: dict[str, Any] = {}
    need_heads: tuple[str, ...] = ()
    if task == "seq-cls" and adapters:
        heads = [s["weight"] for s in read_adapter(next(iter(adapters.values()))).saved_modules.values()
                 if "weight" in s]
        if heads:
            kwargs["num_labels"] = heads[-1].shape[0]
    model, tokenizer = load_model(model_name, task=task, **kwargs)
    # /v1/chat/completions renders with the template the adapters were trained with (--chat-template)
    apply_chat_template(tokenizer, saved_chat_template(list(adapters.values())))
    model.eval()
    if task == "seq-cls":  # a head the checkpoint did not hold is random: adapters must bring their own
        need_heads = tuple(sorted({k.rsplit(".", 1)[0] for k in getattr(model, "lorakit_new_weights", ())}))
    _load_adapters(model, adapters, task, need_heads)
    if pack:
        pack_linears(model, batch_hint=engine_kwargs.get("max_batch", 32))
    return Engine(model, tokenizer, **engine_kwargs), tokenizer, need_heads


def _load_adapters(model: Any, adapters: dict[str, str], task: str, need_heads: tuple[str, ...]) -> None:
    """Load each ``--adapter NAME=DIR``; a bad one is one error line naming the flag."""
    from lorakit.serve import adapters_admin
    from lorakit.serve.protocol import APIError

    for name, path in adapters.items():
        try:
            adapters_admin.load(model, name, path, task, need_heads=need_heads)
        except APIError as exc:
            raise LorakitError(f"--adapter {name}={path}: {exc.message.removeprefix(f'{path}: ')}") from exc


def make_app(args: Any):
    """The FastAPI app ``lorakit serve`` would run for these parsed arguments.

    Args:
        args: ``lorakit serve``'s parsed arguments (``lorakit.cli.serve``).
    """
    from lorakit.serve.app import ServeSettings, create_app
    from lorakit.serve.options import adapter_args, check_args, check_model_len

    check_args(args)
    base = base_for(args.model, list(adapter_args(args.adapter, args.model).values()))
    engine, _, heads = build(base, adapter_args(args.adapter, base), task=args.task, pack=not args.no_pack_weights,
                             max_batch=args.max_batch, max_queue=args.max_queue, batching=not args.no_batching,
                             max_prefill_tokens=args.max_prefill_tokens)
    model_len = check_model_len(args.max_model_len, getattr(engine.model.config, "max_position_embeddings", None))
    settings = ServeSettings(base_name=base, task=args.task, api_key=args.api_key,
                             max_tokens_cap=args.max_tokens_cap, max_model_len=model_len,
                             max_request_bytes=args.max_request_bytes, untrained_heads=heads,
                             max_n=args.max_n, max_prompts=args.max_prompts, adapter_roots=tuple(args.adapter_root),
                             max_loaded_adapters=args.max_loaded_adapters)
    return create_app(engine, settings)


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


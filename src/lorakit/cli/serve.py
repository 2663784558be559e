"""`lorakit serve`: parse the arguments, build the app (``lorakit.serve.server``) and run it on uvicorn."""

from __future__ import annotations

import argparse
import os

from lorakit.cli.common import add_adapters, add_model, add_threads
from lorakit.serve.server import make_app


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lorakit serve", description="An OpenAI-compatible server for one base "
                                "model and many LoRA adapters, with continuous mixed-adapter batching.")
    add_model(p, help_="built-in name (smollm2-135m, minilm-l6) or local folder (default: the built-in or local "
              "base the --adapter folders name)")
    add_adapters(p)
    p.add_argument("--task", default="causal-lm", choices=("causal-lm", "seq-cls"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $LORAKIT_API_KEY; empty is refused)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="most waiting requests; more get 429")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens accepted")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit "
                   "(default: the model's position limit, at most 4096)")
    p.add_argument("--no-batching", action="store_true", help="one request at a time (benchmark baseline)")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="most padded prompt positions prefilled "
                   "in one pass: admitted requests are prefilled together up to this (default 512)")
    p.add_argument("--no-pack-weights", action="store_true", help="multiply by the plain fp32 weights instead of "
                   "oneDNN-packed copies (packing decodes faster and holds one more copy of the base weights)")
    add_threads(p)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body; more is a 413 (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM/SIGINT, wait at most this "
                   "many seconds for open requests, then fail them with a 503 (a second signal: at once)")
    p.add_argument("--max-n", type=int, default=8, help="most choices one request may ask for (n, best_of)")
    p.add_argument("--max-prompts", type=int, default=32, help="most prompts in one /v1/completions request")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="load DIR/NAME on the first request for model NAME (repeat; names checked, no escapes)")
    p.add_argument("--max-loaded-adapters", type=int, default=None,
                   help="most adapters loaded from --adapter-root at once; the least recently used idle one goes")
    return p.parse_args(argv)


def serve_main(argv: list[str]) -> int:
    """``lorakit serve``: load the base and adapters, then serve until SIGINT/SIGTERM.

    Args:
        argv: the arguments after ``lorakit serve``.
    """
    args = _parse(argv)
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.serve.shutdown import DrainingServer

    app = make_app(args)
    key = "API key required" if args.api_key else "no API key: anyone who can connect may use it"
    base = app.state.settings.base_name
    print(f"lorakit serve: {base} with {app.state.engine.adapters()} on http://{args.host}:{args.port} ({key})",
          flush=True)
    # SIGINT/SIGTERM: stop accepting, wait up to --shutdown-timeout for open requests (the lifespan then
    # drains the engine); past it, or on a second signal, the rest get a 503 and the process exits.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    DrainingServer(config, args.shutdown_timeout, app.state.abort).run()
    return 0

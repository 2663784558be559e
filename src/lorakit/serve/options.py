"""Start-up checks of `lorakit serve`'s options: each bad value is one error line before any model loads."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from lorakit.errors import ConfigError
from lorakit.serve.names import adapter_name_problem, shown

# The smallest body cap that still holds an ordinary request.
MIN_REQUEST_BYTES = 1024


def adapter_args(items: list[str], base: str | None) -> dict[str, str]:
    """``--adapter NAME=DIR`` items as {name: dir}; refuses bad, duplicate and base-clashing names.

    Args:
        items: the raw ``--adapter`` values.
        base: the base model's id (``--model``; None while it is still to be taken from the adapters).
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {shown(item)}: expected NAME=DIR")
        problem = adapter_name_problem(name)
        if problem:
            raise ConfigError(f"--adapter {shown(item)}: {problem}")
        if name in out:
            raise ConfigError(f"--adapter {name}: given twice ({out[name]} and {path}); each name serves one adapter")
        if name == base:
            raise ConfigError(f"--adapter {name}: that is the base model's id (--model); pick another name")
        out[name] = path
    return out


def check_args(args: SimpleNamespace) -> None:
    """Refuse option values a server cannot run with (raises ``ConfigError``, one line each).

    Args:
        args: ``lorakit serve``'s parsed arguments.
    """
    at_least = {"--max-batch": (args.max_batch, 1), "--max-queue": (args.max_queue, 1),
                "--max-tokens-cap": (args.max_tokens_cap, 1), "--port": (args.port, 0),
                "--max-request-bytes": (args.max_request_bytes, MIN_REQUEST_BYTES)}
    if args.max_model_len is not None:
        at_least["--max-model-len"] = (args.max_model_len, 2)
    if args.threads is not None:
        at_least["--threads"] = (args.threads, 1)
    at_least["--max-n"] = (args.max_n, 1)
    at_least["--max-prompts"] = (args.max_prompts, 1)
    at_least["--max-prefill-tokens"] = (args.max_prefill_tokens, 1)
    if args.max_loaded_adapters is not None:
        at_least["--max-loaded-adapters"] = (args.max_loaded_adapters, 1)
    for root in args.adapter_root:
        if not Path(root).is_dir():
            raise ConfigError(f"--adapter-root {root}: not a directory")
    for flag, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if args.port > 65535:
        raise ConfigError(f"--port {args.port}: must be at most 65535")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout {args.shutdown_timeout}: must be a finite number of seconds >= 0")
    if args.api_key is not None and (not args.api_key.strip() or args.api_key != args.api_key.strip()):
        raise ConfigError("--api-key / $LORAKIT_API_KEY is empty or has spaces around it: give a real key, or "
                          "unset it to serve without one")


def check_model_len(max_model_len: int | None, limit: int | None) -> int:
    """The context length to serve: ``--max-model-len`` or the model's limit (at most 4096); never above it.

    Args:
        max_model_len: the option's value (None: not given).
        limit: the model's position limit (``max_position_embeddings``), if it has one.
    """
    if max_model_len is None:
        return min(limit or 4096, 4096)
    if limit is not None and max_model_len > limit:
        raise ConfigError(f"--max-model-len {max_model_len}: the model has only {limit} positions")
    return max_model_len

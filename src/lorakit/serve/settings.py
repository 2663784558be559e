"""What one ``lorakit serve`` is configured with: limits, auth, adapters, the task."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Limits and identity of one server.

    Args:
        base_name: the model id of the base model (``--model``).
        task: "causal-lm" (completions) or "seq-cls" (classify).
        api_key: when set, /v1 and /metrics need ``Authorization: Bearer <api_key>``.
        max_tokens_cap: the largest ``max_tokens`` a request may ask for.
        max_model_len: prompt + max_tokens must fit in this many positions.
        retry_after_s: the Retry-After a 429 carries.
        max_classify_inputs: the most texts one /v1/classify request may hold.
        max_request_bytes: the largest request body; more is a 413 before any of it is parsed.
        untrained_heads: modules of the base (a classifier's head) that no checkpoint trained: requests for the
            base id are refused, and adapters must carry their own copy of each.
        max_n: the most sequences one request may ask for (``n``, and ``best_of`` on completions).
        max_prompts: the most prompts one /v1/completions request may hold (each with its own choices).
        adapter_roots: directories whose ``NAME`` subdirectories load on the first request for ``NAME``.
        max_loaded_adapters: the most adapters loaded from ``adapter_roots`` at once (LRU eviction of idle ones).
    """

    base_name: str
    task: str = "causal-lm"
    api_key: str | None = None
    max_tokens_cap: int = 512
    max_model_len: int = 2048
    retry_after_s: int = 1
    max_classify_inputs: int = 64
    max_request_bytes: int = 1 << 20
    untrained_heads: tuple[str, ...] = ()
    max_n: int = 8
    max_prompts: int = 32
    adapter_roots: tuple[str, ...] = ()
    max_loaded_adapters: int | None = None

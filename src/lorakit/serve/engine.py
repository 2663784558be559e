"""The serving engine: a scheduler thread doing continuous batching over mixed adapters.

One thread owns the model. Each iteration it runs queued commands (adapter load/unload, classification),
admits waiting requests (prefilled together, left-padded and routed per row, each keeping a view of its row
of the cache), then advances every active
sequence by one token in a single forward pass under ``lorakit.route_rows``: one batch, one adapter per row.

The batched cache of a decode step is built from the sequences' own caches (left-padded to a common
length, with an attention mask and per-row positions), and each sequence's cache is afterwards a view of
its row. While the batch's membership does not change, the batched cache of the previous step is reused
as is, so a steady step copies no KV beyond what ``DynamicCache.update`` itself does.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorakit.errors import LorakitError
from lorakit.lora.adapters import configs, delete_adapter, route_rows, set_adapter
from lorakit.serve.decode import lean_decoder
from lorakit.serve.detokenize import TextStream
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.sequence import Sequence

SETTLE_MAX_S = 0.1  # the longest an idle engine holds a burst of arrivals before prefilling it


class QueueFull(LorakitError):
    """The bounded wait queue is full (HTTP 429)."""


class ShuttingDown(LorakitError):
    """The engine is draining and accepts no new work (HTTP 503)."""


class UnknownAdapter(LorakitError):
    """No such adapter, or it is being unloaded (HTTP 404)."""


class Engine:
    """Continuous-batching scheduler over one model with any number of adapters.

    Args:
        model: a causal LM (or a sequence classifier for ``classify``) with adapters loaded, eval mode.
        tokenizer: its tokenizer.
        max_batch: the most sequences decoded together.
        max_queue: the most requests waiting for a slot; more raise ``QueueFull``.
        batching: False serves one request at a time with ``set_adapter`` switched per request (the
            benchmark's baseline); True routes rows of one batch to their adapters.
        metrics: where to count tokens, TTFT and latency; None makes a private one.
        max_prefill_tokens: the most padded prompt positions prefilled in one pass (admitted requests are
            prefilled together up to this; a longer prompt is prefilled alone).
        settle_s: an idle engine that receives a request waits until no other one arrived for this long (at most
            ``SETTLE_MAX_S`` in all) before prefilling, so a burst is prefilled together; 0 does not wait.
        lean_decode: decode Llama models through ``lorakit.serve.decode`` (the model's forward otherwise).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 32, max_queue: int = 64,
                 batching: bool = True, metrics: ServeMetrics | None = None,
                 max_prefill_tokens: int = 512, settle_s: float = 0.01, lean_decode: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.lean_step = lean_decoder(model) if lean_decode else None
        self.max_prefill_tokens, self.settle_s = max_prefill_tokens, settle_s
        self.max_batch = max_batch if batching else 1
        self.max_queue, self.batching = max_queue, batching
        self.metrics = metrics or ServeMetrics(lambda: len(self.waiting), lambda: len(self.active))
        self.eos_ids = _eos_ids(model, tokenizer)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._unloading: dict[str, list[Future]] = {}
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._abort: str | None = None  # set by abort(): fail everything at the next step boundary
        # Adapter names as other threads see them: a snapshot refreshed by the engine thread after it changed
        # the model, so no HTTP thread iterates the model's registry while a load mutates it.
        self._loaded = frozenset(configs(model))
        self._batch: tuple[tuple[int, ...], DynamicCache, torch.Tensor] | None = None
        # Counters for tests and /health: finished, cancelled, failed sequences; the largest batch decoded;
        # prefill passes and the most sequences one of them held.
        self.stats: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)

    # -- the outside world (any thread) --------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    def adapters(self) -> list[str]:
        """Servable adapters: loaded and not being unloaded."""
        with self._cv:
            return sorted(n for n in self._loaded if n not in self._unloading)

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises ``QueueFull``, ``ShuttingDown`` or ``UnknownAdapter``."""
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if seq.adapter is not None and (seq.adapter not in self._loaded or seq.adapter in self._unloading):
                raise UnknownAdapter(f"adapter {seq.adapter!r} is not loaded")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        """Drop ``seq`` at the next step boundary (its client went away)."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps (model mutations, classification)."""
        future: Future = Future()
        with self._cv:
            if self._stop:
                raise ShuttingDown("the engine has stopped")
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    def unload(self, name: str) -> Future:
        """Stop admitting requests for ``name``; delete it once its running and queued requests finished.

        The returned future resolves when the adapter is gone. Requests already accepted run to the end.
        """
        future: Future = Future()
        with self._cv:
            if name not in self._loaded:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            self._unloading.setdefault(name, []).append(future)
            self._cv.notify()
        return future

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the accepted ones, then stop the thread."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def abort(self, message: str) -> None:
        """Refuse new work and fail every accepted request with a 503 ``message`` at the next step boundary
        (a forced shutdown: their clients get a clean error instead of a cut connection)."""
        with self._cv:
            self._accepting = False
            self._abort = message
            self._cv.notify()

    def evict_idle(self, order: list[str]) -> str | None:
        """On the engine thread (inside ``call``): delete the first adapter of ``order`` that no running,
        queued or unloading request uses; its name, or None when all are busy.

        Args:
            order: candidate names, the first to evict first.
        """
        with self._cv:
            busy = {s.adapter for s in (*self.waiting, *self.active)} | set(self._unloading)
            for name in order:
                if name not in busy and name in self._loaded:
                    delete_adapter(self.model, name)
                    self._loaded = frozenset(configs(self.model))
                    self._batch = None
                    return name
        return None

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        # no_grad, not inference_mode: adapters hot-loaded here must stay normal tensors (lorakit caches
        # routing stacks by parameter version counters, which inference tensors lack).
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self._commands or self.waiting or self.active or self._unloading or self._stop):
                        self._cv.wait()
                    if self._stop and not (self.waiting or self.active or self._commands or self._unloading):
                        return
                if self._abort:
                    self._fail_all(self._abort)
                self._run_commands()
                self._drop_cancelled()
                self._reap_unloads()
                self._settle()
                self._admit()
                if self.active:
                    self._guarded(self._decode, self.active)

    def _guarded(self, step: Callable[[], None], seqs: list[Sequence]) -> None:
        """Run a model step; if it raises, fail the sequences involved instead of the server."""
        try:
            step()
        except Exception as exc:  # one bad step must not kill the engine thread
            for seq in list(seqs):
                if not seq.done:
                    seq.fail(f"internal error: {type(exc).__name__}: {exc}")
            self.active = [s for s in self.active if not s.done]
            self._batch = None

    def _fail_all(self, message: str) -> None:
        with self._cv:
            seqs, self.waiting = [*self.waiting, *self.active], collections.deque()
            commands, self._commands = list(self._commands), collections.deque()
        self.active, self._batch = [], None
        for seq in seqs:
            if not seq.done:
                seq.fail(message, status=503)
            self._observe(seq)
        for _, future in commands:
            future.set_exception(ShuttingDown(message))

    def _run_commands(self) -> None:
        while True:
            with self._cv:
                if not self._commands:
                    return
                fn, future = self._commands.popleft()
            try:
                result = fn()
            except Exception as exc:  # handed to the caller
                with self._cv:
                    self._loaded = frozenset(configs(self.model))
                future.set_exception(exc)
                continue
            with self._cv:
                self._loaded = frozenset(configs(self.model))
            future.set_result(result)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self.waiting if s.cancelled]
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        gone += [s for s in self.active if s.cancelled]
        self.active = [s for s in self.active if not s.cancelled]
        for seq in gone:
            seq.cancel_done()
            self._observe(seq)

    def _reap_unloads(self) -> None:
        """Delete adapters marked for unloading once no accepted request uses them."""
        with self._cv:
            busy = {s.adapter for s in (*self.waiting, *self.active)}
            ready = [n for n in self._unloading if n not in busy]
            for name in ready:
                futures = self._unloading.pop(name)
                delete_adapter(self.model, name)
                self._loaded = frozenset(configs(self.model))
                self._batch = None
                for future in futures:
                    future.set_result(name)

    def _settle(self) -> None:
        """With nothing decoding, let a burst of requests finish arriving (until ``settle_s`` passes without a new
        one, at most ``SETTLE_MAX_S``) so that it is prefilled in a few full groups, not first one, then the rest."""
        if self.active or not self.batching or self.settle_s <= 0:
            return
        deadline = time.monotonic() + SETTLE_MAX_S
        with self._cv:
            seen = len(self.waiting)
            while 0 < seen < self.max_batch and time.monotonic() < deadline and not self._stop:
                self._cv.wait(self.settle_s)
                if len(self.waiting) == seen:
                    return
                seen = len(self.waiting)

    def _admit(self) -> None:
        """Move waiting requests into the batch, prefilling them in groups (``prefill_groups``)."""
        with self._cv:
            taken = [self.waiting.popleft() for _ in range(min(self.max_batch - len(self.active), len(self.waiting)))]
        for group in prefill_groups(taken, self.max_prefill_tokens if self.batching else 0):
            self._guarded(lambda g=group: self._prefill(g), group)
            for seq in group:
                if seq.done:
                    self._observe(seq)
                else:
                    self.active.append(seq)

    def _routing(self, names: list[str | None], scales: list[float] | None = None):
        """Per-row routing (and adapter scale), or (batching off) the one adapter switched in for the model."""
        if self.batching:
            return route_rows(self.model, names, scales)
        set_adapter(self.model, names[0])
        return _nullcontext()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """One forward pass over the prompts of ``seqs`` (left-padded, each row routed to its adapter), then
        each sequence's first token. A lone prompt runs unpadded, exactly as ``generate`` would."""
        self.stats["prefill_passes"] += 1
        self.stats["peak_prefill"] = max(self.stats["peak_prefill"], len(seqs))
        ids, mask = _left_padded([s.prompt_ids for s in seqs])
        extra = {} if len(seqs) == 1 else {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        # Every position's logits only when the prompt itself is scored (echo with logprobs: prefilled alone).
        keep = 0 if seqs[0].params.prompt_logprobs else 1
        with self._routing([s.adapter for s in seqs], [s.params.lora_scale for s in seqs]):
            out = self.model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=keep, **extra)
        for row, seq in enumerate(seqs):
            pad = ids.shape[1] - len(seq.prompt_ids)
            seq.cache = out.cache if len(seqs) == 1 else _row_cache(out.cache, row, pad)
            seq.cache_len = len(seq.prompt_ids)
            seq.score_prompt(out.logits[row])
            if seq.params.max_tokens == 0:
                seq.finish_unsampled()
                continue
            self._take(seq, out.logits[row, -1])
            self.metrics.generated(1)
            self.metrics.ttft.observe(time.perf_counter() - seq.t_submit)

    def _decode(self) -> None:
        rows = self.active
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(rows))
        cache, mask = self._batched_cache(rows)
        last = torch.tensor([[s.tokens[-1] if s.tokens else s.prompt_ids[-1]] for s in rows], dtype=torch.long)
        positions = torch.tensor([[s.cache_len] for s in rows], dtype=torch.long)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        with self._routing([s.adapter for s in rows], [s.params.lora_scale for s in rows]):
            logits = self._step(last, positions, mask, cache)
        greedy = logits.argmax(-1).tolist()  # one op for the batch; rows with bias, penalties or sampling redo theirs
        for i, seq in enumerate(rows):
            seq.batch_slot = (cache, i, mask.shape[1] - 1 - seq.cache_len)
            seq.cache_len += 1
            self._take(seq, logits[i], greedy[i])
        self.metrics.generated(len(rows))
        finished = [s for s in rows if s.done]
        self.active = [s for s in rows if not s.done]
        self._batch = (tuple(s.id for s in self.active), cache, mask) if not finished else None
        for seq in finished:
            self._observe(seq)

    def _step(self, last: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache):
        """Next-token logits (rows, vocab) of one decode step; ``cache`` gains each row's new position."""
        if self.lean_step is not None:
            return self.lean_step(last, positions, mask, cache)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def _batched_cache(self, rows: list[Sequence]) -> tuple[DynamicCache, torch.Tensor]:
        """The previous step's batched cache when the rows are the same, else one built from each row's."""
        if self._batch is not None and self._batch[0] == tuple(s.id for s in rows):
            return self._batch[1], self._batch[2]
        for seq in rows:
            _materialize(seq)
        length = max(s.cache_len for s in rows)
        cache = DynamicCache()
        cache.layer_class_to_replicate = None
        cache.layers = [_batched_layer([s.cache.layers[i] for s in rows], [s.cache_len for s in rows], length)
                        for i in range(len(rows[0].cache.layers))]  # fmt: skip
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, seq in enumerate(rows):
            mask[i, length - seq.cache_len :] = 1
        return cache, mask

    def _take(self, seq: Sequence, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Sample ``seq``'s next token from its row of logits (``argmax``: that row's argmax, already known),
        score it if asked, and append it."""
        token = argmax if argmax is not None and seq.plain_greedy else seq.sample(logits)
        seq.score(logits, token)
        if seq.text_stream is None:
            seq.text_stream = TextStream(self._decode_text, seq.tokens)
        seq.accept(token, self.eos_ids)

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _observe(self, seq: Sequence) -> None:
        seq.cache = seq.batch_slot = None  # free its KV now, not when the HTTP side drops the object
        self.stats[seq.finish_reason or "finished"] += 1
        if seq.finish_reason not in ("error", "cancelled"):
            self.metrics.latency.observe(time.perf_counter() - seq.t_submit)


class GrowableLayer(DynamicLayer):
    """A KV layer whose keys/values are views of a buffer with spare capacity: a decode step writes its one
    new position in place instead of ``DynamicLayer``'s ``torch.cat`` copy of the whole KV each step.
    Capacity doubles when full, so copies are amortised O(1) per token."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> GrowableLayer:
        """A layer over ready buffers whose first ``length`` positions are filled (no copy)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._length, layer._kbuf, layer._vbuf = length, keys, values
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._length, self._kbuf, self._vbuf = 0, key_states[..., :0, :], value_states[..., :0, :]
        end = self._length + key_states.shape[-2]
        if end > self._kbuf.shape[-2]:
            self._kbuf, self._vbuf = _grown(self._kbuf, self._length, end), _grown(self._vbuf, self._length, end)
        self._kbuf[..., self._length : end, :] = key_states
        self._vbuf[..., self._length : end, :] = value_states
        self._length = end
        self.keys, self.values = self._kbuf[..., :end, :], self._vbuf[..., :end, :]
        return self.keys, self.values


def _grown(buffer: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    """A buffer with room for at least ``needed`` positions (twice that), holding ``buffer``'s first ``used``."""
    out = buffer.new_empty((*buffer.shape[:-2], 2 * needed, buffer.shape[-1]))
    out[..., :used, :] = buffer[..., :used, :]
    return out


def _batched_layer(own: list[DynamicLayer], lengths: list[int], length: int) -> GrowableLayer:
    """One layer of a batch: row i holds ``own[i]``'s KV right-aligned at ``length`` after zero left padding,
    written straight into a buffer with room for as many positions again (one copy per row)."""
    keys, values = own[0].keys, own[0].values
    kbuf = keys.new_zeros((len(own), keys.shape[1], 2 * length, keys.shape[-1]))
    vbuf = values.new_zeros((len(own), values.shape[1], 2 * length, values.shape[-1]))
    for row, (layer, n) in enumerate(zip(own, lengths)):
        kbuf[row, :, length - n : length] = layer.keys[0]
        vbuf[row, :, length - n : length] = layer.values[0]
    return GrowableLayer.holding(kbuf, vbuf, length)


def prefill_groups(seqs: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
    """How admitted sequences are prefilled: prompts scored in full (echo) alone, the others together in
    groups of similar length whose padded size (rows × longest prompt) stays within ``max_tokens``.

    Args:
        seqs: the sequences being admitted.
        max_tokens: the most padded prompt positions of one prefill pass; 0 prefills each sequence alone.
    """
    solo = [s.params.prompt_logprobs or max_tokens <= 0 for s in seqs]
    alone = [[s] for s, single in zip(seqs, solo) if single]
    rest = sorted((s for s, single in zip(seqs, solo) if not single), key=lambda s: len(s.prompt_ids))
    groups: list[list[Sequence]] = []
    for seq in rest:  # ascending length: the newest member is the group's longest
        if groups and (len(groups[-1]) + 1) * len(seq.prompt_ids) <= max_tokens:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return alone + groups


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of prompts right-aligned in one batch; padding is token 0, masked out."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def _row_cache(batched: DynamicCache, row: int, pad: int) -> DynamicCache:
    """One sequence's cache as views of its row of a batched cache (prefill or decode), without its left padding."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = None
    cache.layers = []
    for shared in batched.layers:
        keys, values = shared.keys[row : row + 1, :, pad:], shared.values[row : row + 1, :, pad:]
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _materialize(seq: Sequence) -> None:
    """Make ``seq.cache`` hold its own KV again: views of its row of the batched cache it was last in."""
    if seq.batch_slot is None:
        return
    seq.cache = _row_cache(*seq.batch_slot)
    seq.batch_slot = None


def _eos_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

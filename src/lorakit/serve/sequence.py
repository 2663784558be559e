"""One generation request inside the engine: its tokens, its own KV cache, its sampling and stop logic.

Everything here runs on the engine thread; the outside world only sees the events a sequence emits through
its ``sink`` callback and the ``cancelled`` flag it may set.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lorakit.serve.detokenize import TextStream
from lorakit.serve.sampling import adjusted, adjusts, filtered

if TYPE_CHECKING:  # the engine runs without llguidance unless a request brings a grammar
    from lorakit.serve.structured import Constraint

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for; validated by the HTTP layer before a sequence is made."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each sampled token's log-prob and the k most likely
    prompt_logprobs: bool = False  # also score every prompt token (completions' echo)
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()
    track_score: bool = False  # sum each sampled token's log-prob (best_of ranks candidates by it)
    lora_scale: float = 1.0  # multiplies the adapter's delta on this request's row


# One scored token: (id, log-prob, [(id, log-prob) of the most likely alternatives]); None for a prompt's first.
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Event:
    """Pushed to a request's sink: a text delta, and on the last event the finish reason and counts."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # the HTTP status an error answers with (503: the server is shutting down)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens scored since the last event


@dataclass
class Sequence:
    """A request being served. ``adapter`` None is the base model."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    kind: str = "completion"  # metrics label: completion / chat
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # generated ids (no EOS)
    completion_tokens: int = 0  # generated ids, EOS included (it was computed, so it is counted)
    cache: object | None = None  # its own transformers DynamicCache, filled by prefill
    cache_len: int = 0  # tokens the cache holds
    batch_slot: tuple[object, int, int] | None = None  # (batched cache, row, left pad) while inside a batch
    sent: int = 0  # characters of text already emitted
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per sampled token (EOS included)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set by prefill when asked for
    logprobs_sent: int = 0
    cumulative_logprob: float = 0.0  # summed when params.track_score
    grammar: Constraint | None = None  # response_format's matcher: masks each step's logits, advances per token
    text_stream: TextStream | None = None  # the text of ``tokens``, grown per token; the engine sets it

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        """Whether its next token is the argmax of the raw logits (greedy, no bias, penalty or grammar)."""
        return self.params.temperature <= 0 and self.grammar is None and not adjusts(self.params)

    def sample(self, logits: Tensor) -> int:
        """The next token from one row of logits (vocab,): argmax at temperature 0, else nucleus sampling."""
        p = self.params
        logits = adjusted(logits, p, self.prompt_ids, self.tokens)
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        probs = filtered(torch.softmax(logits.float() / p.temperature, dim=-1), p.top_k, p.top_p, p.min_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def score(self, logits: Tensor, token: int) -> None:
        """Record the log-prob of the sampled ``token`` under the model's own distribution (``logits``)."""
        if self.params.logprobs is None and not self.params.track_score:
            return
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.cumulative_logprob += float(logp[token])
        if self.params.logprobs is not None:
            self.logprobs.append(scored(logp, token, self.params.logprobs))

    def score_prompt(self, logits: Tensor) -> None:
        """Record each prompt token's log-prob from the prefill's logits (prompt_len, vocab)."""
        if not self.params.prompt_logprobs:
            return
        k = self.params.logprobs or 0
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)
        self.prompt_logprobs = [None] + [scored(row, t, k) for row, t in zip(logp, self.prompt_ids[1:])]

    def finish_unsampled(self) -> None:
        """End a request that asked for no new tokens (``echo`` with ``max_tokens`` 0)."""
        self._finish("length")

    def _unsent_logprobs(self) -> list[TokenLogprob]:
        out = self.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.logprobs)
        return out

    def accept(self, token: int, eos_ids: Collection[int]) -> None:
        """Append a sampled token, apply EOS / stop strings / max_tokens, and emit the new text."""
        self.completion_tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.grammar is not None and not self.grammar.advance(token):
            self.fail(f"internal error: the grammar refused token {token}: {self.grammar.error()}")
            return
        if token in eos_ids or token in self.params.stop_token_ids:
            self._finish("stop")
            return
        self.tokens.append(token)
        text = self.text_stream.text()
        cut = _first_stop(text, self.params.stop)
        if cut is not None:
            self.text = text[:cut]
            self._finish("stop")
        elif self.completion_tokens >= self.params.max_tokens:
            self.text = text
            self._finish("length")
        else:
            self.text = text
            # Hold back what might still become a stop string or is half a multi-byte character.
            safe = len(text) - _holdback(text, self.params.stop)
            if safe > self.sent:
                self.sink(Event(text=text[self.sent : safe], logprobs=self._unsent_logprobs()))
                self.sent = safe

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        rest = self.text[self.sent :] if len(self.text) > self.sent else ""
        self.sent = len(self.text)
        self.sink(Event(rest, reason, len(self.prompt_ids), self.completion_tokens, logprobs=self._unsent_logprobs()))

    def fail(self, message: str, status: int = 500) -> None:
        """End with an error event (the HTTP layer turns it into an OpenAI error or a last SSE chunk)."""
        self.finish_reason = "error"
        self.sink(Event(finish_reason="error", prompt_tokens=len(self.prompt_ids),
                        completion_tokens=self.completion_tokens, error=message, status=status))

    def cancel_done(self) -> None:
        self.finish_reason = "cancelled"
        self.sink(Event(finish_reason="cancelled", prompt_tokens=len(self.prompt_ids),
                        completion_tokens=self.completion_tokens))


def scored(logp: Tensor, token: int, k: int) -> TokenLogprob:
    """``token``'s entry from one row of log-probs, with the ``k`` most likely tokens."""
    top = torch.topk(logp, k) if k else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, float(logp[token]), alternatives


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not safe to emit yet."""
    n = len(text) - len(text.rstrip("\ufffd"))  # byte-level BPE: an incomplete UTF-8 character decodes as U+FFFD
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                n = max(n, k)
                break
    return n

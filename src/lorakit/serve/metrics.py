"""Prometheus metrics of one server, in its own registry (several servers can live in one process: tests)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; CPU decoding of a 135M model runs ~10-200 ms per step, whole requests up to minutes.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    """Queue depth, active sequences, token rate, per-adapter requests, TTFT and latency histograms.

    Args:
        queue_depth: called at scrape time for the number of waiting requests.
        active: called at scrape time for the number of sequences in the running batch.
        window_s: the generated tokens/s gauge averages over this many trailing seconds.
    """

    def __init__(self, queue_depth: Callable[[], int], active: Callable[[], int], window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("lorakit_queue_depth", "requests waiting for a batch slot", registry=r).set_function(queue_depth)
        Gauge("lorakit_active_sequences", "sequences in the running batch", registry=r).set_function(active)
        self.tokens = Counter("lorakit_generated_tokens", "tokens generated", registry=r)
        Gauge("lorakit_generated_tokens_per_second", f"tokens/s over the last {window_s:g} s",
              registry=r).set_function(self.tokens_per_second)
        self.requests = Counter("lorakit_requests", "requests accepted, by adapter and endpoint",
                                ["adapter", "endpoint"], registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "submit to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("lorakit_request_latency_seconds", "submit to last token (or classification)",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_loads = Counter("lorakit_adapter_loads", "adapters loaded from --adapter-root on first use",
                                     registry=r)
        self.adapter_evictions = Counter("lorakit_adapter_evictions",
                                         "idle adapters evicted to stay within --max-loaded-adapters", registry=r)
        self.resident = Gauge("lorakit_resident_adapters", "adapters loaded from --adapter-root now", registry=r)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def generated(self, n: int) -> None:
        """Count ``n`` tokens generated now (called by the engine once per step)."""
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self._window_s

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)

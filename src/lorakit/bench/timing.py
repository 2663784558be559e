"""The one timing harness: wall time (and this process's CPU time) of calls, variants taking turns.

Used by the bench worker and by `lorakit latency`. On a shared machine, time spent waiting for a core
inflates wall time but not CPU time (with one torch thread; more threads add their spin-waits), so both
are kept; and the variants of one measurement run round by round, so background load hits all alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# CPU seconds of this process per call, by the key ``time_one`` was given.
CPU_TIMES: dict[str, list[float]] = {}


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer around a call measures the call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_one(fn: Callable[[], Any], device: str, cpu_key: str | None = None) -> float:
    """Wall seconds of one ``fn()``; with ``cpu_key``, its CPU seconds are appended to ``CPU_TIMES[cpu_key]``.

    Args:
        fn: the call to time.
        device: where it runs (``cuda*`` is synchronised before and after).
        cpu_key: where to record the CPU time, if anywhere.
    """
    sync(device)
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    sync(device)
    wall = time.perf_counter() - start
    if cpu_key is not None:
        CPU_TIMES.setdefault(cpu_key, []).append(time.process_time() - cpu)
    return wall


def time_alternating(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str, *, record_cpu: bool = True
) -> dict[str, list[float]]:
    """Run each function once per round, rotating the order (ABC, BCA, ...) so drift hits all alike.

    Args:
        fns: the variants, by name.
        warmup: untimed rounds first.
        repeats: timed rounds.
        device: where they run.
        record_cpu: also record each call's CPU time in ``CPU_TIMES`` under its name.

    Returns:
        Wall seconds per call, ``repeats`` per name.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            times[name].append(time_one(fns[name], device, cpu_key=name if record_cpu else None))
    return times

"""Adapters loaded on first use from ``--adapter-root`` directories, at most ``--max-loaded-adapters`` of them
resident, the least recently used idle one evicted to make room (vLLM's ``max_loras`` and resolvers,
LoRAX's per-request loading).

A request for a model id that is not loaded looks for ``ROOT/NAME`` below each root in order: the name must
pass the adapter-name rule (no separators, no ``..``) and the resolved directory must still lie below the
resolved root (a symlink cannot lead out). Loading and eviction run on the engine thread between steps;
concurrent first requests for one name share one load.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from lorakit.serve import adapters_admin
from lorakit.serve.names import adapter_name_problem
from lorakit.serve.protocol import APIError


class AdapterResolver:
    """Finds, loads and evicts adapters kept below some root directories.

    Args:
        engine: the server's engine (loads run through ``engine.call``).
        roots: directories holding one adapter directory per name.
        max_loaded: the most adapters loaded from the roots at once (None: no bound). Adapters given with
            ``--adapter`` or ``POST /v1/adapters`` are pinned: neither counted nor evicted.
        task: the server's task.
        need_heads: modules every adapter must carry (see ``adapters_admin.check_servable``).
    """

    def __init__(self, engine: Any, roots: list[str], max_loaded: int | None = None, task: str = "causal-lm",
                 need_heads: tuple[str, ...] = ()) -> None:
        self.engine, self.max_loaded, self.task, self.need_heads = engine, max_loaded, task, need_heads
        self.roots = [Path(r).resolve() for r in roots]
        self.lazy: set[str] = set()  # loaded from a root: counted and evictable
        self.last_used: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future] = {}

    def find(self, name: str) -> Path | None:
        """``ROOT/name`` for the first root holding an adapter of that name, or None.

        Args:
            name: the requested model id.
        """
        if adapter_name_problem(name):
            return None
        for root in self.roots:
            folder = (root / name).resolve()
            if folder.is_relative_to(root) and (folder / "adapter_config.json").is_file():
                return folder
        return None

    def touch(self, name: str | None) -> None:
        """Mark ``name`` used now (the LRU order)."""
        if name is not None:
            self.last_used[name] = time.monotonic()

    async def ensure(self, name: str) -> bool:
        """Load ``name`` from a root unless it is loaded; False when no root has it.

        Args:
            name: the requested model id.
        """
        if name in self.engine.adapters():
            return True
        path = self.find(name)
        if path is None:
            return False
        pending = self._loading.get(name)
        if pending is None:  # the first request loads it; others wait for the same load
            pending = asyncio.wrap_future(self.engine.call(lambda: self._load(name, path)))
            self._loading[name] = pending
            pending.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(pending)
        return True

    def _load(self, name: str, path: Path) -> None:
        """On the engine thread: make room if the bound is reached, then load."""
        resident = [n for n in self.lazy if n in self.engine.adapters()]
        if self.max_loaded is not None and len(resident) >= self.max_loaded:
            victim = self.engine.evict_idle(sorted(resident, key=lambda n: self.last_used.get(n, 0.0)))
            if victim is None:
                raise APIError(429, f"all {self.max_loaded} adapters loaded from --adapter-root are in use "
                               "(--max-loaded-adapters); retry later", "rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.lazy.discard(victim)
            self.engine.metrics.adapter_evictions.inc()
        adapters_admin.load(self.engine.model, name, str(path), self.task, need_heads=self.need_heads)
        self.lazy.add(name)
        self.engine.metrics.adapter_loads.inc()

    def resident(self) -> int:
        """Adapters loaded from the roots now."""
        return len([n for n in self.lazy if n in self.engine.adapters()])

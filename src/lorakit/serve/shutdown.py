"""uvicorn's server with a bounded drain: SIGTERM/SIGINT waits at most ``--shutdown-timeout`` seconds for
open requests; then, or at once on a second signal, every request still running or still sending its body
gets a clean 503 and the process exits (a third signal exits without waiting for those 503s).

uvicorn alone waits without bound for a connection whose request is half sent, and only a second SIGINT
(not SIGTERM) forces it out, cutting every open response without a word.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

# After the in-flight requests were failed, the longest wait for their 503s to reach the clients (the engine
# fails running sequences at its next step boundary, and one step of a long prompt's prefill can take seconds).
ERROR_FLUSH_S = 10.0


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose graceful shutdown ends after ``drain_s`` or on a second signal.

    Args:
        config: the uvicorn config (its own ``timeout_graceful_shutdown`` should be None).
        drain_s: the longest graceful drain, in seconds.
        abort: called on the event loop when the drain ends early: fails the in-flight requests cleanly.
    """

    def __init__(self, config: uvicorn.Config, drain_s: float, abort: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_s, self.abort = drain_s, abort
        self.forced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.forced:  # a third signal: out now, answered or not
            self.force_exit = True
            return
        if self.should_exit:
            # The second signal: the watchdog aborts now. Not uvicorn's force_exit yet, which would drop the
            # open responses without the 503 the watchdog gives them first.
            self.forced = True
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await super().shutdown(sockets)
        finally:
            watchdog.cancel()

    async def _watchdog(self) -> None:
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline and not self.forced:
            await asyncio.sleep(0.05)
        self.abort()
        flush_until = time.monotonic() + ERROR_FLUSH_S
        while self.server_state.connections and time.monotonic() < flush_until:
            await asyncio.sleep(0.05)
        self.force_exit = True

"""ASGI middleware bounding what one request can cost before any handler runs.

It caps the request body (``--max-request-bytes``): a declared ``Content-Length`` over the cap is answered 413
without reading a byte, a chunked body is cut off at the cap. While a request's body is still arriving it
can also be failed with a 503 when the server is forced down, so a half-sent request cannot hold the
shutdown forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException

from lorakit.serve.protocol import APIError

Scope = dict[str, Any]
Message = dict[str, Any]


class ShutdownSwitch:
    """Closed when a shutdown is forced: requests still sending their body, and handlers waiting for the
    engine, answer 503 at once."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def event(self) -> asyncio.Event:
        """The event behind the switch (made on first use, on the server's event loop)."""
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def close(self) -> None:
        """Close it (call on the server's event loop)."""
        self.event().set()

    @property
    def closed(self) -> bool:
        return self._event is not None and self._event.is_set()


class RequestLimits:
    """Wraps an ASGI app: a body cap, and a switch that fails requests still sending their body.

    Args:
        app: the inner ASGI app.
        max_bytes: the largest request body accepted.
        switch: closed on a forced shutdown.
    """

    def __init__(self, app: Any, max_bytes: int, switch: ShutdownSwitch) -> None:
        self.app, self.max_bytes, self.switch = app, max_bytes, switch

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, self._too_large(int(declared)))
            return
        await self.app(scope, self._bounded(receive), send)

    def _too_large(self, size: int | None) -> APIError:
        seen = f"{size} bytes" if size is not None else "more"
        return APIError(413, f"the request body is too large: {seen}; this server accepts at most "
                        f"{self.max_bytes} bytes (--max-request-bytes)", code="request_too_large",
                        headers={"Connection": "close"})

    def _bounded(self, receive: Any) -> Any:
        received, complete = 0, False

        async def wrapped() -> Message:
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come: nothing to count or race
                return await receive()
            message = await self._receive_unless_closing(receive)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    err = self._too_large(None)
                    # FastAPI re-raises an HTTPException met while reading the body; app.py maps it to JSON.
                    raise HTTPException(err.status, err.message, headers=err.headers)
            return message

        return wrapped

    async def _receive_unless_closing(self, receive: Any) -> Message:
        closing = self.switch.event()
        if closing.is_set():
            raise HTTPException(503, "the server is shutting down", headers={"Connection": "close"})
        got, stop = asyncio.ensure_future(receive()), asyncio.ensure_future(closing.wait())
        try:
            await asyncio.wait({got, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not got.done():
                got.cancel()
        if got.cancelled() or not got.done():
            raise HTTPException(503, "the server is shutting down", headers={"Connection": "close"})
        return got.result()


async def _send_json(send: Any, err: APIError) -> None:
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})

"""The HTTP layer: the FastAPI app, its auth, error handlers and lifespan; the handlers are in ``routes``.

Handlers never touch the model: generation goes through ``Engine.submit``, adapter changes and
classification through ``Engine.call``, all of which run on the engine thread between decode steps.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve.engine import Engine
from lorakit.serve.limits import RequestLimits, ShutdownSwitch
from lorakit.serve.protocol import APIError
from lorakit.serve.routes import Routes
from lorakit.serve.settings import ServeSettings

__all__ = ["Routes", "ServeSettings", "create_app"]


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """A FastAPI app over ``engine``; its lifespan starts the engine and, on shutdown, drains it.

    Args:
        engine: a not-yet-started engine over the loaded model and adapters.
        settings: limits, identity and the API key.
    """

    loops: list[asyncio.AbstractEventLoop] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loops.append(asyncio.get_running_loop())
        engine.start()
        yield
        # uvicorn has already waited for open requests; this finishes anything still queued.
        await asyncio.to_thread(engine.shutdown)

    if settings.api_key is not None and not settings.api_key.strip():
        raise ValueError("api_key is empty: give a key or None")
    # No /docs, /redoc, /openapi.json: they load scripts from a CDN and describe the API to anyone;
    # docs/serving.md documents the endpoints instead.
    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    switch = ShutdownSwitch()
    app.add_middleware(RequestLimits, max_bytes=settings.max_request_bytes, switch=switch)
    app.state.engine, app.state.settings = engine, settings

    def abort() -> None:  # a forced shutdown: every open request gets a clean 503 (serve/shutdown.py); any thread
        engine.abort("the server is shutting down")
        loops[0].call_soon_threadsafe(switch.close)

    app.state.abort = abort
    _install_error_handlers(app)
    _add_routes(app, engine, settings, switch)
    return app


def _add_routes(app: FastAPI, engine: Engine, settings: ServeSettings, switch: ShutdownSwitch) -> None:
    check_key = _auth_dependency(settings.api_key)
    auth = [Depends(check_key)]

    def health(request: Request) -> dict[str, Any]:
        return _health(engine, settings, request, check_key)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", lambda: Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST),
                      methods=["GET"], dependencies=auth)
    routes = Routes(engine, settings, switch)
    app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/classify", routes.classify, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/adapters", routes.load_adapter, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/adapters/{name}", routes.unload_adapter, methods=["DELETE"], dependencies=auth)


def _health(engine: Engine, settings: ServeSettings, request: Request, check_key: Any) -> dict[str, Any]:
    status = {"status": "ok" if engine.accepting else "draining"}
    try:
        check_key(request)
    except APIError:  # without the key, liveness only: adapter names and load are the key holder's business
        return status
    return {**status, "model": settings.base_name, "task": settings.task, "adapters": engine.adapters(),
            "active": len(engine.active), "queued": len(engine.waiting)}


def _auth_dependency(api_key: str | None):
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: no timing side channel on the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send Authorization: Bearer <key>",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            offset = first.get("loc", ("body", "?"))[-1]
            detail = (first.get("ctx") or {}).get("error", "invalid JSON")
            return APIError(400, f"the body is not valid JSON: {detail} at character {offset}").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid body")
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

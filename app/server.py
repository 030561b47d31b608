"""The Starlette app factory. The engine comes from `engine_factory` (called in a thread at start-up, and again
when AppState restarts a dead engine); everything per server lives in the lifespan state, so several apps can
coexist (tests)."""
from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie_server.app.auth import ApiKeyMiddleware
from pie_server.app.config import ServerConfig
from pie_server.app.errors import EXCEPTION_HANDLERS, ApiError
from pie_server.app.openapi import openapi_document
from pie_server.app.routes import inferlet_ws, inferlets, misc, ui
from pie_server.app.routes.chat import chat_completions
from pie_server.app.routes.completions import completions
from pie_server.app.state import AppState, EngineFactory

# A request body's limit (413 past it), uploads excepted (ServerConfig.max_inferlet_bytes): far above any prompt
# of a 128k context, and above a 20 MB body a client was seen to send (issue 14); bounds what one request can make
# the server hold.
MAX_BODY_BYTES = 32 << 20
_UPLOAD = ("POST", "/v1/inferlets")
_HEALTH_PATHS = frozenset({"/health", "/ping"})


def create_app(engine_factory: EngineFactory, config: ServerConfig = ServerConfig()) -> Starlette:
    state = AppState(engine_factory, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await state.start()
        if not config.accept_before_ready:
            await state.wait_ready()  # a failed load is served too: /health and requests answer 503 with its error
        try:
            yield {"pie": state}
        finally:
            await state.stop()

    async def openapi(_request: Request) -> Response:
        return JSONResponse(openapi_document(config.version))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", misc.models, methods=["GET"]),
        Route("/health", misc.health, methods=["GET"]),
        Route("/ping", misc.health, methods=["GET"]),
        Route("/version", misc.version, methods=["GET"]),
        Route("/metrics", misc.metrics, methods=["GET"]),
        Route("/tokenize", misc.tokenize, methods=["POST"]),
        Route("/detokenize", misc.detokenize, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/inferlets", inferlets.upload, methods=["POST"]),
        Route("/v1/inferlets", inferlets.list_inferlets, methods=["GET"]),
        Route("/v1/inferlets/{ref}", inferlets.get_inferlet, methods=["GET"]),
        Route("/v1/inferlets/{ref}", inferlets.delete_inferlet, methods=["DELETE"]),
        Route("/v1/inferlets/{ref}/runs", inferlets.start_run, methods=["POST"]),
        WebSocketRoute("/v1/inferlets/{ref}/ws", inferlet_ws.run_over_websocket),
        Route("/v1/runs", inferlets.list_runs, methods=["GET"]),
        Route("/v1/runs/{run_id}", inferlets.get_run, methods=["GET"]),
        Route("/v1/runs/{run_id}", inferlets.cancel_run, methods=["DELETE"]),
        *ui.routes(),  # the web page at / and GET /v1/engine/stats
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
                    middleware=[Middleware(RequestGuard, state=state),
                                Middleware(ApiKeyMiddleware, api_key=config.api_key, api_keys=config.api_keys)])
    app.state.pie = state  # for tests and embedding; handlers use the lifespan state
    return app


class RequestGuard:
    """Counts the HTTP requests in flight (what a drain waits for); while draining, answers every new request
    503 (/health too, so a load balancer stops sending); refuses bodies over MAX_BODY_BYTES with 413, by their
    Content-Length at once, else when the bytes received pass it."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            body = {"status": "draining"} if scope["path"] in _HEALTH_PATHS else ApiError(
                "the server is shutting down", 503).body()
            await JSONResponse(body, 503, headers={"connection": "close"})(scope, receive, send)
            return
        if (scope["method"], scope["path"]) != _UPLOAD:
            if _content_length(scope) > MAX_BODY_BYTES:
                await _too_large().response()(scope, receive, send)
                return
            receive = _limited(receive)
        self.state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_in_flight -= 1


def _too_large() -> ApiError:
    return ApiError(f"the request body is over {MAX_BODY_BYTES} bytes", 413, code="request_too_large")


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _limited(receive: Receive) -> Receive:
    """receive, raising ApiError (answered 413) once the body passes MAX_BODY_BYTES (a chunked body)."""
    num_bytes = 0

    async def limited() -> Message:
        nonlocal num_bytes
        message = await receive()
        num_bytes += len(message.get("body", b""))
        if num_bytes > MAX_BODY_BYTES:
            raise _too_large()
        return message

    return limited

"""The Starlette app factory. The engine comes from `engine_factory` (called once, in a thread, at
start-up); everything per server lives in the lifespan state, so several apps can coexist (tests)."""
from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from pie_server.app.auth import ApiKeyMiddleware
from pie_server.app.config import ServerConfig
from pie_server.app.errors import EXCEPTION_HANDLERS
from pie_server.app.openapi import openapi_document
from pie_server.app.routes import inferlet_ws, inferlets, misc, ui
from pie_server.app.routes.chat import chat_completions
from pie_server.app.routes.completions import completions
from pie_server.app.state import AppState, EngineFactory


def create_app(engine_factory: EngineFactory, config: ServerConfig = ServerConfig()) -> Starlette:
    state = AppState(engine_factory, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await state.start()
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
                    middleware=[Middleware(ApiKeyMiddleware, api_key=config.api_key, api_keys=config.api_keys)])
    app.state.pie = state  # for tests and embedding; handlers use the lifespan state
    return app

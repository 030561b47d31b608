"""The web page at `/` (app/static/: plain HTML, JS and CSS, no build step, nothing fetched from elsewhere) and
GET /v1/engine/stats, the JSON numbers its engine panel shows.

The page and its files are open without an API key (app/auth.py): they hold no data. Everything the page shows
comes from the API calls it makes with the key the user types in, /v1/engine/stats included.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from pie_server.app.inferlet_runs import RUNNING
from pie_server.app.state import AppState

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PREFIX = "/static"
# The page runs only its own files and talks only to this server (no inline script, no other origin).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def routes() -> list[BaseRoute]:
    """What server.py mounts: the page, its files and the stats endpoint."""
    return [
        Route("/", index, methods=["GET"]),
        Mount(STATIC_PREFIX, app=StaticFiles(directory=STATIC_DIR), name="static"),
        Route("/v1/engine/stats", engine_stats, methods=["GET"]),
    ]


async def index(_request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


async def engine_stats(request: Request) -> Response:
    """The engine's KV pages and instances (all front ends), this front end's requests and runs (503 while
    loading). kv_cache_usage_perc is a fraction in [0, 1], as the metric of that name; pages held only by the
    prefix cache count as free."""
    state: AppState = request.state.pie
    view, limits = state.ready()
    stats = await asyncio.to_thread(view.control_stats)  # a round trip to the engine core in that set-up
    tenant = state.tenant_of(request)
    # One snapshot for every engine number, so usage and free pages agree (the metric's definition).
    usage = 1.0 - stats.num_free_pages / stats.num_pages if stats.num_pages else 0.0
    body: dict[str, Any] = {
        "object": "engine.stats",
        "model": limits.model_names[0],
        "kv_cache_usage_perc": usage,
        "num_pages": stats.num_pages,
        "num_free_pages": stats.num_free_pages,
        "page_size": view.page_size,
        "num_instances": stats.num_instances,
        "num_requests_running": state.num_running,
        "num_requests_waiting": state.num_queued + stats.num_waiting,
        "num_runs_running": sum(run.status == RUNNING for run in state.runs.list(tenant)),
    }
    return JSONResponse(body)

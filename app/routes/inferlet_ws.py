"""/v1/inferlets/{id or name}/ws: a run with two-way messaging over a WebSocket.

The client's first frame is `{"args": [...], "limits"?: {...}}` (text, JSON; limits as for HTTP runs). The
server then sends, as text frames of JSON, `{"type": "run", "id"}`, one `{"type": "message", "data"}` per message
the inferlet sends, and last `{"type": "done", "status", "error"?}` before it closes. Every later text frame from
the client reaches the inferlet's receive() as it is. A client that goes away cancels the run (its pages are
freed). Errors before the run starts come as `{"type": "error", "error": {...OpenAI's shape}}` and close the
socket (code 1008).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from pie_server.app.errors import ApiError
from pie_server.app.inferlet_runs import Run
from pie_server.app.routes.inferlets import launch_run
from pie_server.app.state import AppState

POLICY_VIOLATION = 1008


async def run_over_websocket(websocket: WebSocket) -> None:
    state: AppState = websocket.state.pie
    await websocket.accept()
    try:
        run = await _start(websocket, state)
    except ApiError as exc:
        await websocket.send_json({"type": "error", **exc.body()})
        await websocket.close(POLICY_VIOLATION)
        return
    except WebSocketDisconnect:
        return
    await websocket.send_json({"type": "run", "id": run.id})
    inbound = asyncio.ensure_future(_client_to_inferlet(websocket, run, lambda: state.runs.cancel(run)))
    try:
        async for message in run.follow():
            await websocket.send_json({"type": "message", "data": message})
        done: dict[str, Any] = {"type": "done", "status": run.status}
        if run.error is not None:
            done["error"] = run.error
        await websocket.send_json(done)
        await websocket.close()
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client went away mid-send
    finally:
        inbound.cancel()
        state.runs.cancel(run)  # a no-op once it ended


async def _start(websocket: WebSocket, state: AppState) -> Run:
    state.ready()
    try:
        first = json.loads(await websocket.receive_text())
    except (ValueError, KeyError) as exc:
        raise ApiError(f"the first frame must be JSON {{\"args\": [...]}}: {exc}") from None
    if not isinstance(first, dict):
        raise ApiError("the first frame must be a JSON object {\"args\": [...]}")
    return await launch_run(state, websocket, first.get("args", []), first.get("limits"))


async def _client_to_inferlet(websocket: WebSocket, run: Run, cancel: Callable[[], None]) -> None:
    """Every text frame to the inferlet's receive(); a full inbox or an oversized message is said back. The
    client going away cancels the run (which ends the sending side too)."""
    try:
        while True:
            text = await websocket.receive_text()
            try:
                run.handle.send(text)
            except ValueError as exc:
                await websocket.send_json({"type": "error", **ApiError(str(exc)).body()})
    except (WebSocketDisconnect, RuntimeError):
        cancel()

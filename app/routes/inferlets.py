"""/v1/inferlets and /v1/runs: upload, list, read and delete inferlets (Wasm components of our WIT world); run
them with arguments and read what they send, streamed (SSE) or at the end; list, read and cancel runs.

Contract (docs/api.md): POST /v1/inferlets?name=NAME with the Wasm bytes -> 201 {"object": "inferlet", "id"
(sha256 of the bytes), "name", "size", "created"}; 400 if the bytes are not a component of our world, 413 over
the server's size limit. POST /v1/inferlets/{id or name}/runs {"args": [...], "stream": bool, "limits"?: {...}}
-> SSE `event: message` per message and a last `event: done` with {"status", "error"?}; or one JSON run object
with its messages. A streamed run's id is in the `x-run-id` header. A run belongs to its request: a client that
goes away cancels it (its pages are freed). Everything is the requesting tenant's (app/auth.py); another
tenant's inferlets and runs are 404, as if they did not exist. Over the tenant's quota of instances: 429. The
built-in inferlets (the default one, the preinstalled contrib ones: app/preinstalled.py) are every tenant's; a
preinstalled one is built on its first run, and listed with its status until then. The name `default` is the
server's: an upload under it is 409. The /v1/runs routes see the runs of every front-end process of the server
(app/inferlet_runs.py); their answers, and a run's start, say in FRONT_END_HEADER which process answered.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from pie_server.app.errors import ApiError, invalid
from pie_server.app.inferlet_runs import Run
from pie_server.app.inferlet_store import StoreError
from pie_server.app.relay import ClientGone, SSEResponse, read_json, until_disconnected
from pie_server.app.run_limits import limit_error, parse_limits
from pie_server.app.state import AppState
from pie_server.engine.runtime.config import LimitError

FRONT_END_HEADER = "x-pie-front-end"  # the answering front-end process's id (its pid): for logs and tests


def _state(request: Request) -> AppState:
    return request.state.pie


def _require_inferlet(state: AppState, connection: HTTPConnection) -> str:
    """404 unless the path's inferlet is one the tenant may run (nothing is built here); returns the tenant."""
    tenant = state.tenant_of(connection)
    if not state.has_inferlet(connection.path_params["ref"], tenant):
        raise ApiError(f"no inferlet {connection.path_params['ref']!r}", 404, code="inferlet_not_found")
    return tenant


async def upload(request: Request) -> Response:
    state = _state(request)
    view, _ = state.ready()
    name = request.query_params.get("name")
    if not name:
        raise invalid("give the inferlet a name: POST /v1/inferlets?name=NAME", param="name")
    tenant = state.tenant_of(request)
    wasm = await _read_limited(request, state.config.max_inferlet_bytes)  # first: a client sending it hears us
    try:
        state.inferlets.check_name(name, tenant)  # before the bytes are compiled
    except StoreError as exc:
        raise _name_error(exc) from None
    try:
        program_hash = await asyncio.to_thread(view.load_program, wasm)
    except ValueError as exc:
        raise invalid(f"not an inferlet component: {exc}", code="invalid_inferlet") from None
    try:
        record = await asyncio.to_thread(state.inferlets.put, wasm, name, tenant)
    except StoreError as exc:
        raise _name_error(exc) from None
    state.remember_program(record, program_hash)
    return JSONResponse(record.public(), status_code=201)


def _name_error(exc: StoreError) -> ApiError:
    return ApiError(str(exc), exc.status, param="name", code="inferlet_name_reserved" if exc.status == 409 else None)


async def list_inferlets(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"object": "list", "data": await state.list_inferlets(state.tenant_of(request))})


async def get_inferlet(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(await state.describe_inferlet(request.path_params["ref"], state.tenant_of(request)))


async def delete_inferlet(request: Request) -> Response:
    state = _state(request)
    try:
        records = state.delete_inferlet(request.path_params["ref"], state.tenant_of(request))
    except StoreError as exc:  # unknown (404), or built in (403)
        raise ApiError(str(exc), exc.status, code="inferlet_not_found" if exc.status == 404 else None) from None
    return JSONResponse({"object": "inferlet.deleted", "id": records[0].id, "names": [r.name for r in records],
                         "deleted": True})


async def launch_run(state: AppState, connection: HTTPConnection, args: Any, limits: Any = None) -> Run:
    """Starts a run of the inferlet the path names (HTTP and WebSocket alike) with the request's "limits"
    (app/run_limits.py); ApiError for what is wrong."""
    state.ready()
    tenant = _require_inferlet(state, connection)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise invalid("args must be a list of strings", param="args")
    instance_limits = parse_limits(limits)
    record = await state.find_inferlet(connection.path_params["ref"], tenant)  # a preinstalled one: built now
    program_hash = await state.program_hash_of(record)
    try:
        handle = await state.launch(program_hash, args, tenant, instance_limits)
    except LimitError as exc:
        raise limit_error(exc) from None
    except ValueError as exc:
        raise invalid(str(exc), param="args") from None
    return state.runs.start(record.id, tenant, handle)


async def start_run(request: Request) -> Response:
    state = _state(request)
    state.ready()
    _require_inferlet(state, request)  # 404 for an unknown inferlet before the body is read
    body = await read_json(request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", param="stream")
    run = await launch_run(state, request, body.get("args", []), body.get("limits"))
    if stream:
        cleanup = contextlib.AsyncExitStack()
        cleanup.callback(state.runs.cancel, run)  # a no-op once the run ended
        return SSEResponse(_sse(run), cleanup, {"x-run-id": run.id, **_front_end(state)})  # type: ignore[return-value]
    try:
        await until_disconnected(request, run.wait())
    except ClientGone:
        state.runs.cancel(run)
        raise
    return JSONResponse(run.public(with_messages=True), headers=_front_end(state))


def _front_end(state: AppState) -> dict[str, str]:
    return {FRONT_END_HEADER: str(state.runs.front_end)}


async def _sse(run: Run) -> AsyncIterator[str]:
    async for message in run.follow():
        yield "event: message\n" + "".join(f"data: {line}\n" for line in message.split("\n")) + "\n"
    done: dict[str, Any] = {"status": run.status}
    if run.error is not None:
        done["error"] = run.error
    yield f"event: done\ndata: {json.dumps(done)}\n\n"


async def list_runs(request: Request) -> Response:
    state = _state(request)
    runs = await state.runs.describe_all(state.tenant_of(request))
    return JSONResponse({"object": "list", "data": runs}, headers=_front_end(state))


def _found(body: dict[str, Any] | None, request: Request) -> JSONResponse:
    """The run, or 404; either way saying which front end answered."""
    if body is None:
        response = ApiError(f"no run {request.path_params['run_id']!r}", 404, code="run_not_found").response()
        response.headers.update(_front_end(_state(request)))
        return response
    return JSONResponse(body, headers=_front_end(_state(request)))


async def get_run(request: Request) -> Response:
    state = _state(request)
    return _found(await state.runs.describe(request.path_params["run_id"], state.tenant_of(request),
                                            with_messages=True), request)


async def cancel_run(request: Request) -> Response:
    state = _state(request)
    return _found(await state.runs.cancel_by_id(request.path_params["run_id"], state.tenant_of(request)), request)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(f"the inferlet is {int(declared)} bytes; this server takes at most {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(f"the inferlet is over {limit} bytes, this server's limit", 413)
        chunks.append(chunk)
    if not size:
        raise invalid("the request body must be the inferlet's Wasm bytes")
    return b"".join(chunks)

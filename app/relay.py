"""Relaying an inferlet run to an HTTP client: disconnect detection, the SSE response, and timings.

A client that goes away cancels the work it waits for; cancellation unwinds AppState.run, which kills the
instance so the runtime frees its pages at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from pie_server.app.errors import ApiError
from pie_server.app.inferlet_run import InferletRun, PromptLogprobs, RunResult, TextDelta
from pie_server.app.metrics import Metrics
from pie_server.app.request_trace import TraceWriter

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, or cancel it (and raise ClientGone) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)  # let the task's cleanup run now


class SSEResponse:
    """text/event-stream of pre-framed SSE strings. Cleanup (killing the instance) runs however the stream
    ends: finished, failed, or cancelled because the client disconnected."""

    def __init__(self, events: AsyncIterator[str], cleanup: contextlib.AsyncExitStack,
                 headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.cleanup = cleanup
        self.headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"), *self.headers]})
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    async for chunk in self.events:
                        await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()

                async def watch() -> None:
                    await _disconnected(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(watch)
        except OSError:
            pass  # the client went away mid-send
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(self.events)
                await self.cleanup.aclose()


async def _aclose(events: AsyncIterator[Any]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


class TimedRelay:
    """Reads a run's outputs while recording TTFT, inter-token latency and end-to-end latency."""

    def __init__(self, run: InferletRun, metrics: Metrics, arrival: float, trace: TraceWriter | None = None) -> None:
        self.run = run
        self.metrics = metrics
        self.arrival = arrival
        self._trace = trace
        self._last: float | None = None

    async def outputs(self) -> AsyncIterator[TextDelta | PromptLogprobs | RunResult]:
        async for item in self.run.outputs():
            if isinstance(item, TextDelta) and item.text:
                now = time.monotonic()
                if self._last is None:
                    self.metrics.observe_ttft(now - self.arrival)
                    if self._trace is not None:
                        self.run.trace.marks["first_token"] = now
                        self._trace.write(self.run.trace, self.arrival)
                else:
                    self.metrics.observe_itl(now - self._last)
                self._last = now
            yield item

    def finish(self, num_prompt_tokens: int, result: RunResult) -> None:
        self.metrics.observe_request(num_prompt_tokens, result.num_completion_tokens,
                                     [c.finish_reason for c in result.choices], time.monotonic() - self.arrival)


async def collect(relay: TimedRelay) -> RunResult:
    """Run to the end (the streamed deltas are only timed: the result holds the whole texts)."""
    async for item in relay.outputs():
        if isinstance(item, RunResult):
            return item
    raise ApiError("the default inferlet ended without a result", 500)


async def read_json(request: Request) -> dict[str, Any]:
    import json

    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer literal over 4300 digits
        raise ApiError(f"the request body is not valid JSON: {exc}", 400) from None
    except RecursionError:  # Python's decoder recurses per nesting level
        raise ApiError("the request body is nested too deeply", 400) from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", 400)
    return body

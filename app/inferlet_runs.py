"""Runs of uploaded inferlets (`/v1/inferlets/{id}/runs`, `/v1/runs`): one instance each, its messages kept for
the run's readers (an SSE stream, a waiting non-stream request, `GET /v1/runs/{id}`).

A run is pumped by an asyncio task of the front end that launched it: every message the instance sends becomes
one entry (text as it is, JSON events as their JSON text), then the run ends `finished`, `failed` (with the
instance's error) or `cancelled` (DELETE, or the server stopping); the runtime frees its pages. Runs live in the
memory of their front end; the newest MAX_KEPT_RUNS ended ones are kept for reading. A run keeps at most
MAX_MESSAGES messages: beyond that the oldest are dropped and counted (a slow or absent reader cannot make the
server hold an endless stream).
"""
from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from pie_server.app.inferlet_run import InstanceHandle
from pie_server.engine.runtime.messages import Event, Terminated, Text

MAX_MESSAGES = 10_000
MAX_KEPT_RUNS = 1_000
RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"


@dataclass(eq=False)
class Run:
    id: str
    inferlet_id: str
    tenant: str
    handle: InstanceHandle
    created: int = field(default_factory=lambda: int(time.time()))
    status: str = RUNNING
    error: str | None = None
    messages: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=MAX_MESSAGES))
    num_messages: int = 0  # ever sent (messages holds the newest MAX_MESSAGES)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def public(self, with_messages: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"object": "run", "id": self.id, "inferlet_id": self.inferlet_id,
                                "created": self.created, "status": self.status, "num_messages": self.num_messages}
        if self.error is not None:
            body["error"] = self.error
        if with_messages:
            body["messages"] = list(self.messages)
            body["num_dropped_messages"] = self.num_messages - len(self.messages)
        return body

    @property
    def ended(self) -> bool:
        return self.status != RUNNING

    async def follow(self) -> AsyncIterator[str]:
        """Every message from the oldest still kept, as they come, until the run ends."""
        next_index = self.num_messages - len(self.messages)
        while True:
            while next_index < self.num_messages:
                first_kept = self.num_messages - len(self.messages)  # again after each yield: more may have come
                next_index = max(next_index, first_kept)
                yield self.messages[next_index - first_kept]
                next_index += 1
            if self.ended:
                return
            self._changed.clear()
            await self._changed.wait()

    async def wait(self) -> None:
        while not self.ended:
            self._changed.clear()
            await self._changed.wait()

    def _add(self, message: str) -> None:
        self.messages.append(message)
        self.num_messages += 1
        self._changed.set()

    def _end(self, status: str, error: str | None = None) -> None:
        if not self.ended:
            self.status, self.error = status, error
            self._changed.set()


class RunRegistry:
    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, inferlet_id: str, tenant: str, handle: InstanceHandle) -> Run:
        run = Run(f"run-{uuid.uuid4().hex}", inferlet_id, tenant, handle)
        self._runs[run.id] = run
        task = asyncio.get_running_loop().create_task(self._pump(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._forget_old()
        return run

    def get(self, run_id: str, tenant: str) -> Run | None:
        run = self._runs.get(run_id)
        return run if run is not None and run.tenant == tenant else None

    def list(self, tenant: str) -> list[Run]:
        return [r for r in self._runs.values() if r.tenant == tenant]

    def cancel(self, run: Run) -> None:
        if not run.ended:
            run._end(CANCELLED)
            run.handle.kill()

    async def close(self) -> None:
        for run in list(self._runs.values()):
            self.cancel(run)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pump(self, run: Run) -> None:
        try:
            while True:
                message = await run.handle.next_message()
                if isinstance(message, Text):
                    run._add(message.text)
                elif isinstance(message, Event):
                    run._add(message.json)
                elif isinstance(message, Terminated):
                    run._end(FINISHED if message.ok else FAILED, message.error)
                    return
        except asyncio.CancelledError:
            self.cancel(run)
            raise

    def _forget_old(self) -> None:
        ended = [r for r in self._runs.values() if r.ended]
        for run in ended[:max(0, len(ended) - MAX_KEPT_RUNS)]:
            del self._runs[run.id]

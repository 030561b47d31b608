"""Runs of uploaded inferlets (`/v1/inferlets/{id}/runs`, `/v1/runs`): one instance each, its messages kept for
the run's readers (an SSE stream, a waiting non-stream request, `GET /v1/runs/{id}`).

A run is pumped by an asyncio task of the front end that launched it (its owner): every message the instance
sends becomes one entry (text as it is, JSON events as their JSON text), then the run ends `finished`, `failed`
(with the instance's error) or `cancelled` (DELETE, or the server stopping); the runtime frees its pages. The
owner keeps its runs in memory (the newest MAX_KEPT_RUNS ended ones are kept for reading); a run keeps at most
MAX_MESSAGES messages and MAX_BUFFER_BYTES of them (UTF-8; the newest message is kept even when it alone is
larger): beyond that the oldest are dropped and counted (`num_dropped_messages`), so a slow or absent reader
cannot make the server hold an endless stream. Dropping the oldest, not backpressure (the inferlet's send
waiting, as its outbox does for a client reading an instance directly), is a decision: a detached run is
expected to go on and finish while nobody reads, and a reader that comes later sees the newest messages and
how many it missed; one following the stream skips those dropped before it got to them. With several
front-end processes, every run is also written to the server's shared run table (app/run_table.py) every
SYNC_INTERVAL_S, so any front end lists, reads and cancels it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from pie_server.app.inferlet_run import InstanceHandle
from pie_server.app.run_table import FILE_NAME, RunRow, RunTable, run_body, server_dir
from pie_server.engine.runtime.messages import Event, Terminated, Text

log = logging.getLogger("pie.app")

MAX_MESSAGES = 10_000
MAX_BUFFER_BYTES = 8 << 20  # per run; with MAX_KEPT_RUNS ended runs kept, set it with the server's memory in mind
MAX_KEPT_RUNS = 1_000
RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"
SYNC_INTERVAL_S = 0.05  # how often an owner writes its runs to the shared table and reads cancellations there
REMOTE_CANCEL_WAIT_S = 5.0  # how long a DELETE for another front end's run waits for its owner to cancel it
FROM_ENVIRONMENT = Path("@server-dir")  # RunRegistry's default: the table in server_dir(), if there is one


@dataclass(eq=False)
class Run:
    id: str
    inferlet_id: str
    tenant: str
    handle: InstanceHandle
    created: int = field(default_factory=lambda: int(time.time()))
    status: str = RUNNING
    error: str | None = None
    messages: collections.deque[str] = field(default_factory=collections.deque)  # the newest, see _add
    num_messages: int = 0  # ever sent
    max_messages: int = MAX_MESSAGES
    max_bytes: int = MAX_BUFFER_BYTES
    num_bytes: int = 0  # of messages, UTF-8
    _sizes: collections.deque[int] = field(default_factory=collections.deque)  # of messages, in bytes
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    on_change: Callable[["Run"], None] | None = None  # called after every message and at the end

    def public(self, with_messages: bool = False) -> dict[str, Any]:
        return run_body(self.id, self.inferlet_id, self.created, self.status, self.num_messages, self.error,
                        list(self.messages) if with_messages else None)

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
        """Keeps the message, dropping the oldest beyond max_messages or max_bytes (never the newest)."""
        size = len(message.encode("utf-8", "surrogatepass"))
        self.messages.append(message)
        self._sizes.append(size)
        self.num_bytes += size
        self.num_messages += 1
        while len(self.messages) > self.max_messages or (
                self.num_bytes > self.max_bytes and len(self.messages) > 1):
            self.messages.popleft()
            self.num_bytes -= self._sizes.popleft()
        self._changed.set()
        if self.on_change is not None:
            self.on_change(self)

    def _end(self, status: str, error: str | None = None) -> None:
        if not self.ended:
            self.status, self.error = status, error
            self._changed.set()
            if self.on_change is not None:
                self.on_change(self)


class RunRegistry:
    """The runs of one front end, and (with a shared table) every front end's runs as the API shows them."""

    def __init__(self, shared_dir: Path | None = FROM_ENVIRONMENT, front_end: int | None = None,
                 max_bytes: int = MAX_BUFFER_BYTES) -> None:
        """shared_dir: the folder the server's front ends share (default: server_dir()); None: memory only.
        front_end: this front end's id in the table (default: the process id). max_bytes: of the messages
        each run keeps (see the module doc)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.front_end = os.getpid() if front_end is None else front_end
        folder = server_dir() if shared_dir is FROM_ENVIRONMENT else shared_dir
        self._table = None if folder is None else RunTable(folder / FILE_NAME, self.front_end, MAX_MESSAGES,
                                                           MAX_KEPT_RUNS)
        self._runs: dict[str, Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed: dict[str, Run] = {}  # runs with news the table has not had yet
        self._num_written: dict[str, int] = {}  # run id -> messages the table has (of this front end's runs)
        self._syncer: asyncio.Task[None] | None = None

    def start(self, inferlet_id: str, tenant: str, handle: InstanceHandle) -> Run:
        run = Run(f"run-{uuid.uuid4().hex}", inferlet_id, tenant, handle, max_bytes=self.max_bytes)
        self._runs[run.id] = run
        task = asyncio.get_running_loop().create_task(self._pump(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._table is not None:
            run.on_change = self._note_change
            self._note_change(run)
            if self._syncer is None:
                self._syncer = asyncio.get_running_loop().create_task(self._sync_forever())
        self._forget_old()
        return run

    def get(self, run_id: str, tenant: str) -> Run | None:
        """This front end's run, or None."""
        run = self._runs.get(run_id)
        return run if run is not None and run.tenant == tenant else None

    def list(self, tenant: str) -> list[Run]:
        """This front end's runs."""
        return [r for r in self._runs.values() if r.tenant == tenant]

    def cancel(self, run: Run) -> None:
        if not run.ended:
            run._end(CANCELLED)
            run.handle.kill()

    async def describe(self, run_id: str, tenant: str, with_messages: bool = False) -> dict[str, Any] | None:
        """The run of any front end as the API shows it; None if the tenant has none of that id."""
        run = self.get(run_id, tenant)
        if run is not None or self._table is None:
            return None if run is None else run.public(with_messages)
        return await asyncio.to_thread(self._table.read, run_id, tenant, with_messages)

    async def describe_all(self, tenant: str) -> list[dict[str, Any]]:
        """Every front end's runs of the tenant, oldest first; this front end's as they are now."""
        mine = {r.id: r.public() for r in self.list(tenant)}
        everyone = [] if self._table is None else await asyncio.to_thread(self._table.list, tenant)
        merged = {body["id"]: mine.get(body["id"], body) for body in everyone} | mine
        return sorted(merged.values(), key=lambda body: body["created"])  # stable: the table's order within a second

    async def cancel_by_id(self, run_id: str, tenant: str) -> dict[str, Any] | None:
        """Cancels the run of any front end (another's: asks its owner through the table and waits, at most
        REMOTE_CANCEL_WAIT_S, for it to say so); the run as it is then, None if the tenant has none of that id."""
        run = self.get(run_id, tenant)
        if run is not None or self._table is None:
            if run is not None:
                self.cancel(run)
            return None if run is None else run.public()
        body = await asyncio.to_thread(self._table.request_cancel, run_id, tenant)
        deadline = time.monotonic() + REMOTE_CANCEL_WAIT_S
        while body is not None and body["status"] == RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(SYNC_INTERVAL_S)
            body = await asyncio.to_thread(self._table.read, run_id, tenant, False)
        return body

    async def close(self) -> None:
        for run in list(self._runs.values()):
            self.cancel(run)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        if self._table is not None:
            await self._sync()  # the cancellations above, for the other front ends to see
            await asyncio.to_thread(self._table.close)

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

    def _note_change(self, run: Run) -> None:
        self._changed[run.id] = run

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            await self._sync()

    async def _sync(self) -> None:
        """Writes what changed (read here, on the event loop, where the runs change) and acts on the
        cancellations other front ends asked for. A table that fails is logged; the runs go on."""
        assert self._table is not None
        changed, self._changed = self._changed, {}
        if not changed and not any(not r.ended for r in self._runs.values()):
            return
        rows = [self._row(run) for run in changed.values()]
        try:
            asked = await asyncio.to_thread(self._table.sync, rows)
        except Exception:  # e.g. the server's folder went at shutdown
            log.exception("the shared run table could not be written")
            self._changed = changed | self._changed  # tried again next time
            return
        for row in rows:
            self._num_written[row.id] = row.num_messages
            if row.status != RUNNING:
                self._num_written.pop(row.id)
        for run_id in asked:
            run = self._runs.get(run_id)
            if run is not None:
                self.cancel(run)

    def _row(self, run: Run) -> RunRow:
        first_kept = run.num_messages - len(run.messages)
        start = max(self._num_written.get(run.id, 0), first_kept)
        new = tuple((seq, run.messages[seq - first_kept]) for seq in range(start, run.num_messages))
        return RunRow(run.id, run.tenant, run.inferlet_id, run.created, run.status, run.error, run.num_messages, new,
                      first_kept)

    def _forget_old(self) -> None:
        ended = [r for r in self._runs.values() if r.ended]
        for run in ended[:max(0, len(ended) - MAX_KEPT_RUNS)]:
            del self._runs[run.id]

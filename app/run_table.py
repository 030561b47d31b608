"""Runs as every front-end process of one server sees them: a SQLite file in the server's own folder, which each
front end writes its runs into and reads the others' from (docs/decisions/shared-runs-and-store.md).

A run is pumped by the front end that launched it (its owner: only there are its instance handle and its
readers); the owner writes the run's row and new messages here a few times a second (app/inferlet_runs.py), and
another front end that is asked to cancel it sets `cancel_requested`, which the owner reads at its next write and
acts on (its instance killed, pages freed), then writes the run `cancelled`. So every front end lists, reads and
cancels every run of the asking tenant; what another front end says of a run is at most one write interval old.

The folder is the engine core's run directory (engine/core/process.py), made fresh by `pie serve` for each start
and removed when it stops: runs live as long as the server, as they did in memory. A server of one process has
no such folder and keeps its runs in memory only. A row whose owner process is gone (it crashed: its instances
went with it) is settled `failed` by whoever reads it.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pie_server.engine.core.process import ENV_VAR as CORE_ENV_VAR
from pie_server.engine.core.process import CoreAddress
from pie_server.engine.processes import is_alive

FILE_NAME = "runs.sqlite3"
RUNNING = "running"
OWNER_GONE = "the front-end process that ran it stopped"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, inferlet_id TEXT NOT NULL, created INTEGER NOT NULL,
    status TEXT NOT NULL, error TEXT, num_messages INTEGER NOT NULL, front_end INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, ended_at REAL);
CREATE INDEX IF NOT EXISTS runs_of_tenant ON runs (tenant);
CREATE TABLE IF NOT EXISTS messages (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL, PRIMARY KEY (run_id, seq)) WITHOUT ROWID;
"""
_COLUMNS = "id, tenant, inferlet_id, created, status, error, num_messages, front_end"


def server_dir() -> Path | None:
    """The folder the processes of this server share (the engine core's run directory), None in a server of
    one process."""
    value = os.environ.get(CORE_ENV_VAR)
    return Path(CoreAddress.from_env(value).run_dir) if value else None


def run_body(run_id: str, inferlet_id: str, created: int, status: str, num_messages: int, error: str | None,
             messages: list[str] | None = None) -> dict[str, Any]:
    """A run as the API shows it (GET /v1/runs/{id}: with its kept messages)."""
    body: dict[str, Any] = {"object": "run", "id": run_id, "inferlet_id": inferlet_id, "created": created,
                            "status": status, "num_messages": num_messages}
    if error is not None:
        body["error"] = error
    if messages is not None:
        body["messages"] = messages
        body["num_dropped_messages"] = num_messages - len(messages)
    return body


@dataclass(frozen=True)
class RunRow:
    """One run as its owner writes it: its state now and the messages not written before, (seq, text)."""
    id: str
    tenant: str
    inferlet_id: str
    created: int
    status: str
    error: str | None
    num_messages: int
    new_messages: tuple[tuple[int, str], ...] = ()
    first_kept: int = 0  # the seq of the oldest message the owner keeps: older ones are dropped here too


class RunTable:
    """Blocking and thread-safe: call it from a worker thread (asyncio.to_thread), never the event loop."""

    def __init__(self, path: Path, front_end: int, max_messages: int, max_ended_runs: int) -> None:
        self.front_end = front_end
        self._max_messages, self._max_ended_runs = max_messages, max_ended_runs
        # Autocommit: every write below is one explicit transaction. Durability is not needed (the file goes
        # with the server), so no fsync: a write costs tens of microseconds.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.executescript(_SCHEMA)

    def sync(self, rows: Sequence[RunRow]) -> list[str]:
        """Writes the owner's rows; returns the ids of its running runs that another front end asked to cancel."""
        with self._lock, self._transaction():
            for row in rows:
                self._write(row)
            if any(row.status != RUNNING for row in rows):
                self._forget_old()
            return [run_id for (run_id,) in self._db.execute(
                "SELECT id FROM runs WHERE front_end = ? AND status = ? AND cancel_requested = 1",
                (self.front_end, RUNNING))]

    def read(self, run_id: str, tenant: str, with_messages: bool) -> dict[str, Any] | None:
        with self._lock, self._transaction():
            row = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ? AND tenant = ?",
                                   (run_id, tenant)).fetchone()
            if row is None:
                return None
            messages = [text for (text,) in self._db.execute(
                "SELECT text FROM messages WHERE run_id = ? ORDER BY seq", (run_id,))] if with_messages else None
            return self._body(self._settled(row), messages)

    def list(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's runs, oldest first."""
        with self._lock, self._transaction():
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM runs WHERE tenant = ? ORDER BY rowid",
                                    (tenant,)).fetchall()
            return [self._body(self._settled(row)) for row in rows]

    def request_cancel(self, run_id: str, tenant: str) -> dict[str, Any] | None:
        """Asks the owner to cancel the run (if it is running); the run as it is now, None if unknown."""
        with self._lock, self._transaction():
            self._db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ? AND tenant = ? AND status = ?",
                             (run_id, tenant, RUNNING))
        return self.read(run_id, tenant, with_messages=False)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)

    def _write(self, row: RunRow) -> None:
        ended_at = None if row.status == RUNNING else time.time()
        self._db.execute(
            "INSERT INTO runs (id, tenant, inferlet_id, created, status, error, num_messages, front_end, ended_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "error = excluded.error, num_messages = excluded.num_messages, ended_at = excluded.ended_at",
            (row.id, row.tenant, row.inferlet_id, row.created, row.status, row.error, row.num_messages,
             self.front_end, ended_at))
        self._db.executemany("INSERT OR REPLACE INTO messages (run_id, seq, text) VALUES (?, ?, ?)",
                             [(row.id, seq, text) for seq, text in row.new_messages])
        first_kept = max(row.first_kept, row.num_messages - self._max_messages)
        if first_kept > 0:
            self._db.execute("DELETE FROM messages WHERE run_id = ? AND seq < ?", (row.id, first_kept))

    def _forget_old(self) -> None:
        """Keeps the newest max_ended_runs ended runs (of every front end)."""
        old = [run_id for (run_id,) in self._db.execute(
            "SELECT id FROM runs WHERE ended_at IS NOT NULL ORDER BY ended_at DESC LIMIT -1 OFFSET ?",
            (self._max_ended_runs,))]
        for run_id in old:
            self._db.execute("DELETE FROM messages WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def _settled(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """The row, written `failed` first if it is running and its owner process is gone."""
        run_id, _, _, _, status, _, _, owner = row
        if status != RUNNING or owner == self.front_end or is_alive(owner):
            return row
        self._db.execute("UPDATE runs SET status = 'failed', error = ?, ended_at = ? WHERE id = ? AND status = ?",
                         (OWNER_GONE, time.time(), run_id, RUNNING))
        return (*row[:4], "failed", OWNER_GONE, *row[6:])

    @staticmethod
    def _body(row: tuple[Any, ...], messages: list[str] | None = None) -> dict[str, Any]:
        run_id, _, inferlet_id, created, status, error, num_messages, _ = row
        return run_body(run_id, inferlet_id, created, status, num_messages, error, messages)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): the writer lock is taken at once, so a read-then-write
    never has to be retried."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")

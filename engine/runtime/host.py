"""Shared state of the host functions: the engine's services and per-runtime stores."""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pie_server.engine.control.api import Control
from pie_server.engine.core.process import ENV_VAR as CORE_ENV_VAR
from pie_server.engine.core.process import CoreAddress
from pie_server.engine.grammar import GrammarCompiler, LazyCompiler
from pie_server.engine.runtime.config import ModelInfo, RuntimeConfig
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.tokenizer import RuntimeTokenizer, StreamDecoder

STORE_FILE_NAME = "kv-store.sqlite3"
FROM_ENVIRONMENT = "@server-dir"  # TenantStore's default path: shared_store_path()
SET_UP_TIMEOUT_S = 30.0  # TenantStore: how long to retry a file another process is setting up
_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    tenant TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (tenant TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
"""


class BroadcastBus:
    """Topic -> subscribed instances (of any tenant; a broadcast reaches its sender's tenant). Used from the
    scheduler thread only."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[InstanceState]] = collections.defaultdict(set)

    def subscribe(self, inst: InstanceState, topic: str) -> None:
        self._subscribers[topic].add(inst)
        inst.topics.add(topic)

    def unsubscribe(self, inst: InstanceState, topic: str) -> None:
        members = self._subscribers.get(topic)
        if members is not None:
            members.discard(inst)
            if not members:
                del self._subscribers[topic]
        inst.topics.discard(topic)

    def receivers(self, sender: InstanceState, topic: str) -> list[InstanceState]:
        """Subscribers other than the sender, of the sender's tenant only: tenants never hear each other."""
        return [i for i in self._subscribers.get(topic, ()) if i is not sender and i.tenant == sender.tenant]

    def publish(self, sender: InstanceState, topic: str, message: str) -> int:
        receivers = self.receivers(sender, topic)
        for inst in receivers:
            inst.broadcasts.put((topic, message))
        return len(receivers)

    def drop(self, inst: InstanceState) -> None:
        for topic in list(inst.topics):
            self.unsubscribe(inst, topic)


class TenantStore:
    """The per-tenant key-value store (`store` interface), with a byte quota per tenant (keys and values, UTF-8).
    Thread-safe.

    One server's front-end processes share it: it is a SQLite file in the server's own folder (the engine core's
    run directory, shared_store_path()), which `pie serve` makes for each start and removes when it stops; so
    what an instance sets, any instance of the same tenant reads, whichever front end runs it, for as long as
    the server runs (as exported KV pages, which live in the engine core). The quota is checked and the write
    made in one transaction, so it holds for the front ends together. A runtime with no such folder (a server of
    one process, tests) keeps the same table in memory. No fsync: the file does not outlive the server, and a
    write costs tens of microseconds (host calls run on the scheduler thread)."""

    def __init__(self, max_bytes_per_tenant: int, path: str | None = FROM_ENVIRONMENT) -> None:
        """path: the SQLite file (default: shared_store_path()); None: in memory, this process's alone."""
        self._max_bytes = max_bytes_per_tenant
        where = shared_store_path() if path is FROM_ENVIRONMENT else path
        self._db = sqlite3.connect(where or ":memory:", timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._set_up(shared=where is not None)

    def _set_up(self, shared: bool) -> None:
        """Several front ends open the file at once when a server starts. Switching it to WAL takes an exclusive
        lock, and SQLite answers a second connection that tries meanwhile "database is locked" at once, without
        waiting out the busy timeout (seen with `pie serve --api-processes 2`: a front end failed to start)."""
        deadline = time.monotonic() + SET_UP_TIMEOUT_S
        while True:
            try:
                if shared:
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=OFF")
                self._db.executescript(_STORE_SCHEMA)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def get(self, tenant: str, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
        return None if row is None else row[0]

    def set(self, tenant: str, key: str, value: str) -> None:
        size = len(key.encode()) + len(value.encode())
        with self._lock, self._transaction():
            old = self._db.execute("SELECT size FROM kv WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
            used = self._db.execute("SELECT bytes FROM usage WHERE tenant = ?", (tenant,)).fetchone()
            change = size - (0 if old is None else old[0])
            if (0 if used is None else used[0]) + change > self._max_bytes:
                raise ValueError(f"the tenant's store is full ({self._max_bytes} bytes)")
            self._db.execute("INSERT OR REPLACE INTO kv (tenant, key, value, size) VALUES (?, ?, ?, ?)",
                             (tenant, key, value, size))
            self._add_usage(tenant, change)

    def delete(self, tenant: str, key: str) -> bool:
        with self._lock, self._transaction():
            old = self._db.execute("SELECT size FROM kv WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
            if old is None:
                return False
            self._db.execute("DELETE FROM kv WHERE tenant = ? AND key = ?", (tenant, key))
            self._add_usage(tenant, -old[0])
            return True

    def keys(self, tenant: str, prefix: str) -> list[str]:
        """Sorted by code point (SQLite's binary order of UTF-8 is that order): the keys from prefix on, while
        they start with it."""
        with self._lock:
            rows = self._db.execute("SELECT key FROM kv WHERE tenant = ? AND key >= ? ORDER BY key", (tenant, prefix))
            return list(itertools.takewhile(lambda key: key.startswith(prefix), (key for (key,) in rows)))

    def _add_usage(self, tenant: str, change: int) -> None:
        self._db.execute("INSERT INTO usage (tenant, bytes) VALUES (?, ?) "
                         "ON CONFLICT (tenant) DO UPDATE SET bytes = bytes + excluded.bytes", (tenant, change))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE: the write lock at once (across processes), so the quota check and the write agree."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def shared_store_path() -> str | None:
    """The store's file in the folder this server's processes share (engine/core/process.py: the engine core's
    run directory, handed to the front ends in the environment); None in a server of one process."""
    value = os.environ.get(CORE_ENV_VAR)
    return None if not value else os.path.join(CoreAddress.from_env(value).run_dir, STORE_FILE_NAME)


@dataclass
class Host:
    control: Control
    tokenizer: RuntimeTokenizer
    model: ModelInfo
    config: RuntimeConfig
    call_later: Callable[[float, Callable[[], None]], None]  # scheduler-thread timers
    run_blocking: Callable[[Callable[[], Any]], Any]  # -> Future, for blocking I/O off the scheduler
    bus: BroadcastBus = field(default_factory=BroadcastBus)
    store: TenantStore = field(default_factory=lambda: TenantStore(64 << 20))
    decoders: dict[int, tuple[InstanceState, StreamDecoder]] = field(default_factory=dict)
    # The grammar compiler of constrained `generate` calls (api_generate.py), built on first use; a server of one
    # process shares the control layer's (one vocabulary table for llguidance, one cache of compiled grammars).
    grammars: LazyCompiler | None = None

    def __post_init__(self) -> None:
        if self.grammars is None:
            self.grammars = LazyCompiler(self._grammar_compiler)

    def _grammar_compiler(self) -> GrammarCompiler:
        model, tokenizer = self.model, self.tokenizer
        return GrammarCompiler(tokenizer.vocabulary(), model.vocab_size, model.eos_token_ids, model.bos_token_id,
                               tokenizer.encode)

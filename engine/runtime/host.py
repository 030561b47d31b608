"""Shared state of the host functions: the engine's services and per-runtime stores."""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from pie_server.engine.control.api import Control
from pie_server.engine.runtime.config import ModelInfo, RuntimeConfig
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.tokenizer import RuntimeTokenizer, StreamDecoder


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
    """The per-tenant key-value store (in memory, thread-safe), with a byte quota per tenant."""

    def __init__(self, max_bytes_per_tenant: int) -> None:
        self._max_bytes = max_bytes_per_tenant
        self._data: dict[str, dict[str, str]] = collections.defaultdict(dict)
        self._bytes: dict[str, int] = collections.defaultdict(int)
        self._lock = threading.Lock()

    def get(self, tenant: str, key: str) -> str | None:
        with self._lock:
            return self._data[tenant].get(key)

    def set(self, tenant: str, key: str, value: str) -> None:
        size = len(key.encode()) + len(value.encode())
        with self._lock:
            old = self._data[tenant].get(key)
            old_size = 0 if old is None else len(key.encode()) + len(old.encode())
            if self._bytes[tenant] - old_size + size > self._max_bytes:
                raise ValueError(f"the tenant's store is full ({self._max_bytes} bytes)")
            self._data[tenant][key] = value
            self._bytes[tenant] += size - old_size

    def delete(self, tenant: str, key: str) -> bool:
        with self._lock:
            old = self._data[tenant].pop(key, None)
            if old is None:
                return False
            self._bytes[tenant] -= len(key.encode()) + len(old.encode())
            return True

    def keys(self, tenant: str, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._data[tenant] if k.startswith(prefix))


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
    grammars: Any = None  # engine.runtime.grammar.GrammarCompiler, made on first use

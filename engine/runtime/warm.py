"""Warm instances: instances of a program started before their launch (`pie serve --warm-instances N`).

A warm instance is instantiated, runs its inferlet's prepare() (pie_sdk.export; the default inferlet warms
the paths a request takes), and parks in `runtime.arguments` until a launch takes it. A launch then only sets
its arguments, tenant and deadline and wakes it. Until its launch it is a background instance: the scheduler
polls it only when nothing else waits, so warming takes idle time and never delays a running request; a
front end that is never idle simply launches cold.

Decisions:
- Only parked instances are taken: one still warming would run prepare() for a request that could have gone
  cold at the same cost. A launch that finds none parked launches cold, and every take starts a replacement.
- Only launches with the warm instances' limits take one (the limits are fixed when an instance starts:
  open_instance tells the control layer its page quota).
- A warm instance counts in its tenant's live instances from its launch; before that it belongs to nobody.
- A warm instance that ends before its launch (a trap in prepare(), a shutdown) is not replaced until the next
  take: a program that fails while warming must not restart itself in a loop.
- take() runs in the launching thread and reads two fields the scheduler thread writes (parked, finished);
  the pool's lock makes each instance taken once, and one that ends just after it was taken reports its end
  to the launch's handle as any instance does.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pie_server.engine.runtime.config import InstanceLimits
from pie_server.engine.runtime.instance import InstanceState


@dataclass
class _Pool:
    component: Any  # kept for the replacements (a program evicted from the cache meanwhile still starts)
    limits: InstanceLimits
    num_wanted: int
    states: list[InstanceState] = field(default_factory=list)  # warming or parked, oldest first


class WarmInstances:
    """Per program: the warm instances and how many to keep. Thread-safe (launches come from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self.num_taken = 0  # launches served by a warm instance

    def keep(self, program_hash: str, component: Any, limits: InstanceLimits, num_instances: int) -> None:
        if num_instances < 0:
            raise ValueError("num_instances must be at least 0")
        with self._lock:
            pool = self._pools.get(program_hash)
            if pool is None:
                self._pools[program_hash] = _Pool(component, limits, num_instances)
            else:
                pool.num_wanted = num_instances

    def num_missing(self, program_hash: str) -> tuple[int, Any, InstanceLimits | None]:
        """How many instances to start now, the component and the limits to start them with."""
        with self._lock:
            pool = self._pools.get(program_hash)
            if pool is None:
                return 0, None, None
            return max(0, pool.num_wanted - len(pool.states)), pool.component, pool.limits

    def add(self, program_hash: str, state: InstanceState) -> None:
        with self._lock:
            self._pools[program_hash].states.append(state)

    def take(self, program_hash: str, limits: InstanceLimits) -> InstanceState | None:
        """A parked warm instance of the program with these limits (no longer in the pool), or None."""
        with self._lock:
            pool = self._pools.get(program_hash)
            if pool is None or pool.limits != limits:
                return None
            for i, state in enumerate(pool.states):
                if state.parked and not state.finished:
                    del pool.states[i]
                    self.num_taken += 1
                    return state
        return None

    def give_back(self, state: InstanceState) -> None:
        """A taken instance whose launch was refused (the tenant's quota): parked as it was, first in line."""
        with self._lock:
            self._pools[state.program_hash].states.insert(0, state)
            self.num_taken -= 1

    def discard(self, state: InstanceState) -> None:
        """A warm instance ended before its launch."""
        with self._lock:
            pool = self._pools.get(state.program_hash)
            if pool is not None and state in pool.states:
                pool.states.remove(state)

    def num_parked(self, program_hash: str) -> int:
        with self._lock:
            pool = self._pools.get(program_hash)
            return 0 if pool is None else sum(1 for s in pool.states if s.parked and not s.finished)

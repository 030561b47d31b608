"""The control layer's record of one instance, and the page demands that wait for free pages."""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.work import CopyItem, ForwardItem
from pie_server.engine.types import InstanceId, VirtualPageId

_arrivals = itertools.count()
_demotions = itertools.count(1)


@dataclass(eq=False, slots=True)
class InstanceState:
    instance_id: InstanceId
    seq: int  # open order: a larger seq is a newer instance (preempted first)
    table: PageTable
    queue: deque[ForwardItem | CopyItem] = field(default_factory=deque)  # submission order
    num_pages_requested: int = 0  # by allocations still waiting in the demand queue
    swap_in_queued: bool = False
    # Set when the instance lost its KV for good (a failed step that was moving it): every later call fails.
    failure: str | None = None
    closed: bool = False
    # 0, or when the instance last lost pages held beyond its fair share (a count): see rank.
    demotion: int = 0

    @property
    def rank(self) -> tuple[int, int]:
        """Its age for serving and preemption (smaller: older, served first, preempted last). An instance that
        lost pages for holding more than its fair share ranks after every other, as if it had just arrived,
        so it cannot take them back at once by age (docs/decisions/kv-fair-share.md)."""
        return self.demotion, self.seq

    def demote(self) -> None:
        self.demotion = next(_demotions)

    @property
    def num_queued_forwards(self) -> int:
        return sum(1 for item in self.queue if isinstance(item, ForwardItem))


@dataclass(eq=False)
class Allocation:
    """allocate_pages waiting for num_pages free pages."""

    instance: InstanceState
    num_pages: int
    future: Future[list[VirtualPageId]]
    arrival: int = field(default_factory=lambda: next(_arrivals))

    @property
    def num_new_pages(self) -> int:
        return self.num_pages


@dataclass(eq=False)
class SwapIn:
    """A preempted instance with queued work waiting for pages to bring its blocks back."""

    instance: InstanceState
    arrival: int = field(default_factory=lambda: next(_arrivals))
    num_new_pages = 0  # it only brings its own blocks back


Demand = Allocation | SwapIn


class DemandQueue:
    """Waiting demands, oldest instance first, then in arrival order (FIFO per instance).

    Ordering by instance age rather than by request time is a decision: it is first-come-first-served per
    instance (as vLLM serves requests), and it makes preemption one-directional (the head demand may only take
    pages from newer instances), so instances do not swap each other out in turn, and the oldest
    instance always gets what it needs and finishes. Age is InstanceState.rank: an instance that lost pages
    for holding more than its fair share ranks as the newest (docs/decisions/kv-fair-share.md).
    """

    def __init__(self) -> None:
        self._demands: list[Demand] = []

    def __len__(self) -> int:
        return len(self._demands)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._demands))

    @property
    def head(self) -> Demand:
        return self._demands[0]

    def push(self, demand: Demand) -> None:
        bisect.insort(self._demands, demand, key=_order)

    def reorder(self) -> None:
        """After an instance's rank changed."""
        self._demands.sort(key=_order)

    def pop_head(self) -> Demand:
        return self._demands.pop(0)

    def remove(self, demand: Demand) -> None:
        self._demands.remove(demand)

    def remove_instance(self, instance: InstanceState) -> list[Demand]:
        removed = [d for d in self._demands if d.instance is instance]
        self._demands = [d for d in self._demands if d.instance is not instance]
        return removed

    def has_others(self, instance: InstanceState) -> bool:
        """A demand of another instance waits too."""
        return any(d.instance is not instance for d in self._demands)

    def waiting_instances(self) -> set[int]:
        """ids of the instances with a waiting demand."""
        return {id(d.instance) for d in self._demands}


def _order(demand: Demand) -> tuple[tuple[int, int], int]:
    return demand.instance.rank, demand.arrival

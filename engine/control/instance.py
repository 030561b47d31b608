"""The control layer's record of one instance, and the page demands that wait for free pages."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.control.page_table import PageTable
from engine.control.work import CopyItem, ForwardItem
from engine.types import InstanceId, VirtualPageId


@dataclass(eq=False)
class InstanceState:
    instance_id: InstanceId
    seq: int  # open order: a larger seq is a newer instance (preempted first)
    table: PageTable
    queue: deque[ForwardItem | CopyItem] = field(default_factory=deque)  # submission order
    num_pages_requested: int = 0  # by allocations still waiting in the demand queue
    swap_in_queued: bool = False
    # Set when the instance was preempted without swap space (the last resort): every later call fails.
    failure: str | None = None
    closed: bool = False

    @property
    def num_queued_forwards(self) -> int:
        return sum(1 for item in self.queue if isinstance(item, ForwardItem))


@dataclass(eq=False)
class Allocation:
    """allocate_pages waiting for num_pages free pages."""

    instance: InstanceState
    num_pages: int
    future: Future[list[VirtualPageId]]


@dataclass(eq=False)
class SwapIn:
    """A preempted instance with queued work waiting for pages to bring its blocks back."""

    instance: InstanceState


Demand = Allocation | SwapIn

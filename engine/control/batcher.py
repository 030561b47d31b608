"""The batcher's policy: which queued commands form the next step.

Everything queued when the executor finishes a step is a candidate (Pie's adaptive policy). Under a token
budget and a command budget, decodes (forwards with few remaining tokens) are taken first, then prefills,
the last of which may be cut into a chunk that fits the remaining budget. Per instance, commands are taken
strictly in submission order: copies only before the instance's first forward of the step (page copies run
before every forward of a step), and a further forward only if it is independent of the ones already taken
(it neither writes a page they use nor uses a page they write). This module only decides; the controller
applies the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.instance import InstanceState
from pie_server.engine.control.work import CopyItem, ForwardItem
from pie_server.engine.types import VirtualPageId


@dataclass(eq=False, slots=True)
class Chunk:
    instance: InstanceState
    item: ForwardItem
    start: int  # token range [start, end) of the item
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.item.num_tokens


@dataclass
class StepPlan:
    copies: list[tuple[InstanceState, CopyItem]] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    # Per instance, how many queue items (from the head) are fully taken; a chunked item stays queued.
    num_consumed: dict[InstanceState, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.copies and not self.chunks


@dataclass(slots=True)
class _Cursor:
    position: int = 0  # next queue index to consider
    done: bool = False
    took_forward: bool = False
    # Pages of the forwards taken this step, and the pages they write: built by _add only when a further
    # forward of the queue may be considered (most steps take one forward per instance).
    read_ids: set[VirtualPageId] | None = None
    write_ids: set[VirtualPageId] | None = None


class _Planner:
    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.plan = StepPlan()
        self.budget = config.max_batch_tokens
        self.seats = config.max_batch_size
        self.prefill_taken = False  # whether the prefill pass has taken anything yet

    def advance(self, instance: InstanceState, cursor: _Cursor, decodes_only: bool) -> None:
        queue = instance.queue
        while not cursor.done and cursor.position < len(queue):
            item = queue[cursor.position]
            if isinstance(item, CopyItem):
                if cursor.took_forward:
                    cursor.done = True  # a copy must wait for the next step, and so must all after it
                    return
                self.plan.copies.append((instance, item))
                cursor.position += 1
                continue
            remaining = item.num_tokens - item.num_scheduled  # item.num_remaining (no property call)
            if decodes_only and remaining > self.config.decode_max_tokens:
                return  # the prefill pass takes it (and maybe chunks it)
            if not self._take_forward(instance, cursor, item, remaining, decodes_only):
                return

    def _take_forward(self, instance: InstanceState, cursor: _Cursor, item: ForwardItem, remaining: int,
                      decodes_only: bool) -> bool:
        """Takes item whole (True: look further) or as a last chunk, or stops (False)."""
        if self.seats == 0 or (cursor.took_forward and self._conflicts(cursor, item)):
            cursor.done = True
            return False
        start = item.num_scheduled
        if remaining <= self.budget:
            self._add(instance, cursor, item, start, item.num_tokens, decodes_only)
            cursor.position += 1
            return True
        if decodes_only:
            return False
        if item.chunkable and self.budget > 0:
            self._add(instance, cursor, item, start, start + self.budget, decodes_only)
        elif not item.chunkable and not self.prefill_taken:
            # A look-ahead mask needs all its tokens in one command: it may exceed the budget as the first
            # prefill of a step (so it cannot starve behind decodes).
            self._add(instance, cursor, item, start, item.num_tokens, decodes_only)
            cursor.position += 1
        cursor.done = True
        return False

    def _add(self, instance: InstanceState, cursor: _Cursor, item: ForwardItem, start: int, end: int,
             decodes_only: bool) -> None:
        self.plan.chunks.append(Chunk(instance, item, start, end))
        self.prefill_taken = self.prefill_taken or not decodes_only
        self.budget = max(0, self.budget - (end - start))
        self.seats -= 1
        cursor.took_forward = True
        if cursor.position + 1 < len(instance.queue):  # only needed if a further forward is considered
            if cursor.read_ids is None or cursor.write_ids is None:
                cursor.read_ids, cursor.write_ids = set(), set()
            cursor.read_ids.update(item.page_ids)
            cursor.write_ids.update(item.written_ids)

    @staticmethod
    def _conflicts(cursor: _Cursor, item: ForwardItem) -> bool:
        """Whether item writes a page an earlier forward of the step uses, or uses one it writes."""
        read_ids, write_ids = cursor.read_ids, cursor.write_ids
        if not cursor.took_forward or read_ids is None or write_ids is None:
            return False  # None: no forward was taken with a further one in view (see _add)
        return any(p in read_ids for p in item.written_ids) or any(p in write_ids for p in item.page_ids)


def plan_step(instances: Iterable[InstanceState], config: ControlConfig, num_reserved: int = 0) -> StepPlan:
    """instances: those with queued work that may run now (resident, not failed), oldest work first.
    num_reserved: seats (and one token each) already taken by decodes that join the step without the planner."""
    planner = _Planner(config)
    planner.seats -= num_reserved
    planner.budget -= num_reserved
    cursors = {instance: _Cursor() for instance in instances}
    for decodes_only in (True, False):
        for instance, cursor in cursors.items():
            if not cursor.done and cursor.position < len(instance.queue):  # advance's own test, hoisted
                planner.advance(instance, cursor, decodes_only)
    planner.plan.num_consumed = {inst: c.position for inst, c in cursors.items() if c.position}
    return planner.plan

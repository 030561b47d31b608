"""Preemption: which instance gives up its pages when nothing else can make progress, and which pages.

Only blocks an instance owns exclusively (every reference comes from its own page table) and that are
resident are swapped out: a block shared with another instance, an export or the prefix cache stays on the
device, so nobody else ever waits for a swap-in they did not cause. The victim is the newest instance that
has such blocks among those the head demand may preempt (see choose_victim).
"""
from __future__ import annotations

from typing import AbstractSet as Set, Iterable

from pie_server.engine.control.instance import InstanceState
from pie_server.engine.control.pages import BlockId, PagePool


def swappable_blocks(instance: InstanceState, pool: PagePool, keep: Set[BlockId] = frozenset()
                     ) -> list[BlockId]:
    return [block_id for block_id, count in instance.table.block_counts().items()
            if pool.refcount(block_id) == count and pool.is_resident(block_id) and block_id not in keep]


def nonresident_blocks(instance: InstanceState, pool: PagePool) -> list[BlockId]:
    """Distinct blocks of the instance that live in host memory (it cannot run until they are back)."""
    if pool.num_swapped_blocks == 0:
        return []
    return [block_id for block_id in instance.table.block_counts() if not pool.is_resident(block_id)]


def choose_victim(instances: Iterable[InstanceState], head: InstanceState, pool: PagePool,
                  keep: Set[BlockId] = frozenset()) -> tuple[InstanceState, list[BlockId]] | None:
    """The newest instance newer than head with swappable blocks (outside keep), and those blocks.

    Only newer instances: the oldest waiting instance is always served first and never loses its pages to
    a newer one, so preemption cannot go round in circles. keep: blocks swapped in while forming this batch
    (a batch runs its swap-outs first, so swapping them out again would save pages without their KV yet)."""
    candidates = [i for i in instances if i.seq > head.seq and i.failure is None and not i.closed]
    for instance in sorted(candidates, key=lambda i: -i.seq):
        block_ids = swappable_blocks(instance, pool, keep)
        if block_ids:
            return instance, block_ids
    return None

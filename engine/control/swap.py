"""Preemption: which instance gives up its pages when nothing else can make progress, and which pages.

Only blocks an instance owns exclusively (every reference comes from its own page table) and that are
resident are swapped out: a block shared with another instance, an export or the prefix cache stays on the
device, so nobody else ever waits for a swap-in they did not cause. The victim is the newest instance that
has such blocks among those the head demand may preempt (see choose_victim); when there is none, an instance
holding more than its fair share of the pool gives up the excess (see choose_hoarder and
docs/decisions/kv-fair-share.md).
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
    """The newest instance newer than head (by rank) with swappable blocks (outside keep), and those blocks.

    Only newer instances: the oldest waiting instance is always served first and never loses its pages to
    a newer one, so preemption cannot go round in circles. keep: blocks swapped in while forming this batch
    (a batch runs its swap-outs first, so swapping them out again would save pages without their KV yet)."""
    candidates = [i for i in instances if i.rank > head.rank and i.failure is None and not i.closed]
    for instance in sorted(candidates, key=lambda i: i.rank, reverse=True):
        block_ids = swappable_blocks(instance, pool, keep)
        if block_ids:
            return instance, block_ids
    return None


def num_resident_blocks(instance: InstanceState, pool: PagePool) -> int:
    """Distinct device pages the instance's table names (shared ones included: it keeps them on the device)."""
    return sum(1 for block_id in instance.table.block_counts() if pool.is_resident(block_id))


def choose_hoarder(instances: Iterable[InstanceState], head: InstanceState, pool: PagePool, share: int,
                   num_wanted: int, keep: Set[BlockId] = frozenset()
                   ) -> tuple[InstanceState, list[BlockId]] | None:
    """The instance other than head with the most resident pages beyond share, and up to num_wanted of its
    swappable blocks (outside keep) but never more than its excess: it keeps its share on the device.

    This is how an instance that holds the pool (and lingers) cannot stall the others: preemption by age
    (choose_victim) never touches an older instance, this does, but only its pages beyond its share, and only
    when the head demand can be met no other way (the caller tries choose_victim first). The caller demotes
    the victim (InstanceState.demote), so it cannot take the pages back by age at once."""
    best: tuple[int, InstanceState, list[BlockId]] | None = None
    for instance in instances:
        if instance is head or instance.failure is not None or instance.closed:
            continue
        excess = num_resident_blocks(instance, pool) - share
        if excess > 0 and (best is None or excess > best[0] or (excess == best[0] and instance.rank > best[1].rank)):
            block_ids = swappable_blocks(instance, pool, keep)
            if block_ids:
                best = (excess, instance, block_ids)
    if best is None:
        return None
    excess, victim, block_ids = best
    return victim, block_ids[-min(excess, max(1, num_wanted), len(block_ids)):]

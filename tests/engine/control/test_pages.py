"""The building blocks: the refcounted page pool, per-instance page tables, the prefix cache."""
from __future__ import annotations

import pytest

from pie_server.engine.control.api import ControlError
from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.pages import PagePool
from pie_server.engine.control.prefix_cache import PrefixCache


def test_refcount_lifecycle_returns_page_exactly_at_zero() -> None:
    pool = PagePool(num_pages=4)
    [block] = pool.allocate(1)
    page = pool.page(block)
    assert pool.num_free_pages == 3
    pool.incref(block)
    pool.incref(block)
    assert pool.refcount(block) == 3
    assert pool.decref(block) is False and pool.decref(block) is False
    assert pool.num_free_pages == 3  # still referenced once
    assert pool.decref(block) is True
    assert pool.num_free_pages == 4 and pool.num_blocks == 0
    with pytest.raises(KeyError):
        pool.incref(block)  # a freed block is gone
    [again] = pool.allocate(1)
    assert pool.page(again) == page and again != block  # LIFO page reuse, fresh block id


def test_allocate_more_than_free_changes_nothing() -> None:
    pool = PagePool(num_pages=2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    assert pool.num_free_pages == 2 and pool.num_blocks == 0


def test_swap_out_frees_page_and_swap_in_remaps() -> None:
    pool = PagePool(num_pages=2, num_swap_slots=1)
    [block] = pool.allocate(1)
    old_page = pool.page(block)
    assert pool.placement_version == 0
    out = pool.swap_out(block)
    assert out.page_id == old_page and not pool.is_resident(block)
    assert pool.num_free_pages == 2 and pool.num_free_swap_slots == 0 and pool.num_swapped_blocks == 1
    with pytest.raises(RuntimeError):
        pool.page(block)
    [other] = pool.allocate(1)  # takes the page the swap-out freed
    assert pool.placement_version == 1  # a block moved: page lists looked up before are stale (scheduling.py)
    back = pool.swap_in(block)
    assert pool.placement_version == 2
    assert back.swap_slot == out.swap_slot and back.page_id != pool.page(other)
    assert pool.page(block) == back.page_id and pool.num_free_pages == 0
    assert pool.num_free_swap_slots == 0  # the slot is reusable only once the batch is formed
    pool.end_batch()
    assert pool.num_free_swap_slots == 1
    pool.decref(block)
    pool.decref(other)
    assert pool.num_free_pages == 2


def test_freeing_a_swapped_block_frees_its_slot() -> None:
    pool = PagePool(num_pages=1, num_swap_slots=1)
    [block] = pool.allocate(1)
    pool.swap_out(block)
    pool.decref(block)
    assert pool.num_free_swap_slots == 1 and pool.num_free_pages == 1 and pool.num_swapped_blocks == 0


def test_page_table_ids_validation_quota_and_retired_pages() -> None:
    table = PageTable(page_size=4, max_pages=3)
    ids = table.add([10, 11])
    assert ids == [0, 1] and table.blocks(ids) == [10, 11]
    table.check_quota(1)
    with pytest.raises(ControlError, match="quota"):
        table.check_quota(2)
    with pytest.raises(ControlError, match="quota"):
        table.check_quota(1, num_reserved=1)
    with pytest.raises(ControlError, match="unknown page id 7"):
        table.block(7)
    with pytest.raises(ControlError, match="duplicate"):
        table.remove([0, 0])
    with pytest.raises(ControlError, match="unknown page id 5"):
        table.remove([0, 5])
    assert table.num_pages == 2  # all or nothing
    assert table.remove([0, 1], in_use={0, 1}) == []  # both retired: queued commands use them
    with pytest.raises(ControlError, match="already freed"):
        table.block(0)
    assert table.has_retired and sorted(table.block_counts()) == [10, 11]
    assert table.release_retired(in_use={0}) == [11]
    assert table.release_retired(in_use=set()) == [10]
    assert table.num_pages == 0 and not table.block_counts() and not table.has_retired
    assert table.add([12]) == [2]  # ids are never reused


def test_page_table_visibility() -> None:
    table = PageTable(page_size=4, max_pages=None)
    [page] = table.add([5])
    with pytest.raises(ControlError, match="page size is 4"):
        table.set_visibility(page, [True, False])
    table.set_visibility(page, [True, False, True, True])
    assert table.visibility(page) == [True, False, True, True] and table.has_hidden_slots([page])
    table.set_visibility(page, [True] * 4)
    assert table.visibility(page) is None and not table.has_hidden_slots([page])
    with pytest.raises(ControlError, match="must be positive"):
        PageTable(page_size=4, max_pages=0)


def test_prefix_cache_hit_miss_and_stats() -> None:
    cache = PrefixCache(page_size=2)
    assert cache.publish([1, 2, 3, 4, 5], [100, 101]) == [100, 101]
    assert cache.lookup([1, 2, 3, 4, 9, 9]) == [100, 101]
    assert cache.lookup([1, 2, 3, 9]) == [100]
    assert cache.lookup([9, 2, 3, 4]) == []  # block 1 alone is no prefix
    assert cache.lookup([1, 2, 3, 4], max_blocks=1) == [100]
    assert (cache.num_queries, cache.num_query_tokens, cache.num_hit_tokens) == (4, 18, 8)
    # Same content again (another block): nothing new is cached; a longer chain extends the old one.
    assert cache.publish([1, 2, 3, 4, 5, 6], [200, 201, 202]) == [202]
    assert cache.lookup([1, 2, 3, 4, 5, 6]) == [100, 101, 202]
    assert cache.publish([7, 8], [100]) == []  # one entry per block


def test_prefix_cache_evicts_lru_leaves_first() -> None:
    cache = PrefixCache(page_size=1)
    cache.publish([1, 2, 3], [10, 11, 12])
    cache.publish([5], [20])
    cache.lookup([5])  # 20 is now the most recently used
    evictable = {10, 11, 12, 20}
    assert cache.count_evictable(evictable.__contains__) == 4
    assert cache.count_evictable({10, 11, 20}.__contains__) == 1  # 12 pinned keeps its chain
    assert cache.evict(evictable.__contains__, 2) == [12, 11]  # the chain's leaf first, then its new leaf
    assert cache.lookup([1, 2, 3]) == [10]
    assert cache.evict(lambda b: b != 10, 5) == [20]
    assert sorted(cache.clear()) == [10] and cache.num_blocks == 0


def test_prefix_cache_colliding_keys_are_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    import pie_server.engine.control.prefix_cache as module
    cache = PrefixCache(page_size=1)
    monkeypatch.setattr(module, "hash", lambda value: 42, raising=False)  # every key collides
    assert cache.publish([1], [10]) == [10]
    assert cache.lookup([2]) == []  # same key, other tokens: a miss, never block 10
    assert cache.publish([2], [11]) == []
    assert cache.lookup([1]) == [10]


def _check_lru_order(cache: PrefixCache) -> None:
    """Every entry comes before its parent (less recently used): what one-pass eviction relies on."""
    order = {key: position for position, key in enumerate(cache._entries)}
    for key, entry in cache._entries.items():
        assert entry.parent_key not in order or order[entry.parent_key] > order[key]


@pytest.mark.parametrize("seed", range(20))
def test_prefix_cache_one_pass_eviction_frees_exactly_when_the_full_count_allows(seed: int) -> None:
    """evict_lru (one pass, stopping when it has enough) after random publishes, lookups and evictions of
    branching chains with random blocks in use: it succeeds exactly when count_evictable() says enough can go,
    removes only evictable leaves (or chains of them), nothing when it fails, and keeps the LRU order's invariant
    (it moves the entries in use it passes, with their ancestors, to the recent end)."""
    import random

    rng = random.Random(seed)
    cache = PrefixCache(page_size=1)
    next_block = iter(range(10_000))
    for _ in range(80):
        chain = [rng.randrange(3) for _ in range(rng.randrange(1, 7))]  # few token values: shared prefixes
        if rng.random() < 0.6:
            cache.publish(chain, [next(next_block) for _ in chain])
        else:
            cache.lookup(chain)
        _check_lru_order(cache)
        in_use = set(rng.sample(cache.blocks(), k=min(len(cache.blocks()), rng.randrange(4))))
        is_evictable = lambda block: block not in in_use  # noqa: E731
        wanted = rng.randrange(1, 6)
        can = cache.count_evictable(is_evictable) >= wanted
        before = {entry.block_id: key for key, entry in cache._entries.items()}
        evicted = cache.evict_lru(is_evictable, wanted)
        _check_lru_order(cache)
        if not can:
            assert evicted is None and sorted(cache.blocks()) == sorted(before)
            continue
        assert evicted is not None and len(evicted) == wanted and not in_use.intersection(evicted)
        assert sorted(cache.blocks()) == sorted(set(before) - set(evicted))
        gone = {before[block] for block in evicted}
        assert all(entry.parent_key not in gone for entry in cache._entries.values())  # leaves went first


def test_prefix_cache_one_pass_eviction_moves_the_entries_in_use_it_passes() -> None:
    """A chain in use at the head of the order is walked once, then sits at the recent end with its root."""
    cache = PrefixCache(page_size=1)
    cache.publish([1, 2, 3], [10, 11, 12])  # in use below (a running agent's prompt)
    cache.publish([4], [20])
    cache.publish([5], [21])
    in_use = {10, 11, 12}
    assert cache.evict_lru(lambda block: block not in in_use, 1) == [20]
    assert cache.blocks() == [21, 12, 11, 10]  # the chain in use moved behind 21, leaf first
    assert cache.evict_lru(lambda block: block not in in_use, 2) is None  # only 21 could go
    assert cache.blocks() == [21, 12, 11, 10]

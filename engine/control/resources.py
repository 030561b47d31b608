"""KV page bookkeeping shared by every instance: the pool, exports and the prefix cache, and the operations
that move references between them and the instances' page tables. No locking and no futures here: the
controller calls these under its lock. Every method validates before it changes anything.
"""
from __future__ import annotations

from typing import Sequence

from pie_server.engine.control.api import ControlError
from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.pages import BlockId, PagePool
from pie_server.engine.control.prefix_cache import PrefixCache
from pie_server.engine.types import TokenId, VirtualPageId


class Resources:
    def __init__(self, num_pages: int, page_size: int, num_swap_slots: int) -> None:
        self.page_size = page_size
        self.pool = PagePool(num_pages, num_swap_slots)
        self.cache = PrefixCache(page_size)
        self.exports: dict[str, list[BlockId]] = {}  # each holds one reference per block

    # -- free pages ---------------------------------------------------------------------------------------
    def _cache_only(self, block_id: BlockId) -> bool:
        return self.pool.refcount(block_id) == 1 and self.pool.is_resident(block_id)

    def num_available_pages(self) -> int:
        """Free pages plus cached pages that eviction could free now."""
        return self.pool.num_free_pages + self.cache.count_evictable(self._cache_only)

    def make_free(self, num_pages: int) -> bool:
        """Evicts cache-only pages until num_pages are free; False (evicting nothing) if that cannot be."""
        missing = num_pages - self.pool.num_free_pages
        if missing <= 0:
            return True
        evicted = self.cache.evict_lru(self._cache_only, missing) if self.cache.num_blocks >= missing else None
        if evicted is None:
            return False
        self.drop(evicted)
        return True

    def reclaim_swap_slots(self, num_slots: int) -> None:
        """Evicts swapped-out pages that only the prefix cache holds, until num_slots slots are free."""
        missing = num_slots - self.pool.num_free_swap_slots
        if missing > 0:
            pool = self.pool
            self.drop(self.cache.evict(lambda b: pool.refcount(b) == 1 and not pool.is_resident(b), missing))

    def try_allocate(self, num_pages: int) -> list[BlockId] | None:
        return self.pool.allocate(num_pages) if self.make_free(num_pages) else None

    def drop(self, block_ids: Sequence[BlockId]) -> None:
        for block_id in block_ids:
            self.pool.decref(block_id)

    def share_into(self, table: PageTable, block_ids: Sequence[BlockId]) -> list[VirtualPageId]:
        """New virtual ids in table for existing blocks (one more reference each)."""
        for block_id in block_ids:
            self.pool.incref(block_id)
        return table.add(block_ids)

    # -- exports ------------------------------------------------------------------------------------------
    def export(self, table: PageTable, page_ids: Sequence[VirtualPageId], name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ControlError("an export needs a non-empty name")
        if name in self.exports:
            raise ControlError(f"the export name {name!r} is taken")
        block_ids = table.blocks(page_ids)
        if not block_ids:
            raise ControlError("export at least one page")
        for block_id in block_ids:
            self.pool.incref(block_id)
        self.exports[name] = block_ids

    def import_(self, table: PageTable, name: str) -> list[VirtualPageId]:
        block_ids = self.exports.get(name)
        if block_ids is None:
            raise ControlError(f"no pages are exported under {name!r}")
        table.check_quota(len(block_ids))
        return self.share_into(table, block_ids)

    def unexport(self, name: str) -> None:
        block_ids = self.exports.pop(name, None)
        if block_ids is None:
            raise ControlError(f"no pages are exported under {name!r}")
        self.drop(block_ids)

    # -- prefix cache -------------------------------------------------------------------------------------
    def prefix_lookup(self, table: PageTable, token_ids: Sequence[TokenId]) -> tuple[list[VirtualPageId], int]:
        room = None if table.max_pages is None else max(0, table.max_pages - table.num_pages)
        block_ids = self.cache.lookup(token_ids, max_blocks=room)
        return self.share_into(table, block_ids), len(block_ids) * self.page_size

    def prefix_publish(self, table: PageTable, token_ids: Sequence[TokenId],
                       page_ids: Sequence[VirtualPageId]) -> None:
        num_full = len(token_ids) // self.page_size
        num_holding = -(-len(token_ids) // self.page_size)
        if len(page_ids) not in (num_full, num_holding):
            raise ControlError(f"{len(token_ids)} tokens fill {num_full} pages (the last of {num_holding} "
                               f"partly); got {len(page_ids)} pages")
        block_ids = table.blocks(page_ids[:num_full], distinct=True)
        for block_id in self.cache.publish(token_ids, block_ids):
            self.pool.incref(block_id)

    def clear_prefix_cache(self) -> None:
        self.drop(self.cache.clear())

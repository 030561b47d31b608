"""One instance's view of its KV pages: virtual page ids -> blocks, slot visibility, quota.

Virtual ids are small ints handed out in increasing order and never reused, so a freed id stays invalid.
Several virtual ids may name the same block (share_pages); the block's refcount counts each of them.
Freeing a page that a queued (not yet scheduled) command uses unmaps its id at once (new commands cannot
name it) but keeps its block, as a *retired* page, until no queued command uses it; the caller says which
ids are in use (it knows the queue), so forwards pay nothing for this.
"""
from __future__ import annotations

from collections import Counter
from typing import AbstractSet, Iterable, Iterator, Sequence

from pie_server.engine.control.api import KV_EVICTED, ControlError
from pie_server.engine.control.pages import BlockId
from pie_server.engine.types import VirtualPageId


class PageTable:
    def __init__(self, page_size: int, max_pages: int | None) -> None:
        if max_pages is not None and max_pages <= 0:
            raise ControlError(f"max_pages must be positive, got {max_pages}")
        self.page_size = page_size
        self.max_pages = max_pages
        self._blocks: dict[VirtualPageId, BlockId] = {}
        self._retired: dict[VirtualPageId, BlockId] = {}  # freed while queued commands use them
        # Hidden slots per page: a list of page_size bools (False = hidden); absent = all visible.
        self._visibility: dict[VirtualPageId, list[bool]] = {}
        self._next_id: VirtualPageId = 0
        self._evicted_below: VirtualPageId = 0  # ids under this that are unmapped lost their KV to an eviction
        # Bumped whenever a mapped id goes away or a page's visibility changes: a caller that validated some
        # ids at one version may take them as still valid, mapped to the same blocks, at the same version.
        self.version = 0

    @property
    def num_pages(self) -> int:
        return len(self._blocks)

    def check_quota(self, num_new: int, num_reserved: int = 0) -> None:
        """Raises unless num_new more pages (beyond num_reserved already promised) fit the quota."""
        if self.max_pages is not None and self.num_pages + num_reserved + num_new > self.max_pages:
            raise ControlError(
                f"page quota exceeded: the instance holds {self.num_pages} pages"
                + (f" (+{num_reserved} being allocated)" if num_reserved else "")
                + f", asked for {num_new} more, its limit is {self.max_pages}")

    def add(self, block_ids: Iterable[BlockId]) -> list[VirtualPageId]:
        """Maps fresh virtual ids to the blocks (the caller has taken a reference for each)."""
        page_ids = []
        for block_id in block_ids:
            self._blocks[self._next_id] = block_id
            page_ids.append(self._next_id)
            self._next_id += 1
        return page_ids

    def block(self, page_id: VirtualPageId) -> BlockId:
        block_id = self._blocks.get(page_id)
        if block_id is None:
            raise ControlError(self._unknown(page_id))
        return block_id

    def get_block(self, page_id: VirtualPageId) -> BlockId | None:
        """The page's block, None for an id this table does not map (block() says why)."""
        return self._blocks.get(page_id)

    def blocks(self, page_ids: Sequence[VirtualPageId], distinct: bool = False) -> list[BlockId]:
        """Validates every id (and, if distinct, that none repeats) before returning their blocks."""
        get = self._blocks.get
        block_ids = [get(page_id) for page_id in page_ids]
        if None in block_ids:
            raise ControlError(self._unknown(page_ids[block_ids.index(None)]))
        if distinct and len(set(page_ids)) != len(page_ids):
            raise ControlError(f"duplicate page ids in {list(page_ids)}")
        return block_ids  # type: ignore[return-value]

    def remove(self, page_ids: Sequence[VirtualPageId], in_use: AbstractSet[VirtualPageId] = frozenset()
               ) -> list[BlockId]:
        """Unmaps the pages (all or none); returns the blocks to drop now. Pages in in_use (used by queued
        commands) are retired instead: see release_retired."""
        self.blocks(page_ids, distinct=True)
        self.version += 1
        dropped = []
        for page_id in page_ids:
            block_id = self._blocks.pop(page_id)
            self._visibility.pop(page_id, None)
            if page_id in in_use:
                self._retired[page_id] = block_id
            else:
                dropped.append(block_id)
        return dropped

    @property
    def has_retired(self) -> bool:
        return bool(self._retired)

    def release_retired(self, in_use: AbstractSet[VirtualPageId]) -> list[BlockId]:
        """Forgets the retired pages outside in_use; returns their blocks for the caller to drop."""
        released = [page_id for page_id in self._retired if page_id not in in_use]
        return [self._retired.pop(page_id) for page_id in released]

    def remove_all(self) -> list[BlockId]:
        block_ids = [*self._blocks.values(), *self._retired.values()]
        self.version += 1
        self._blocks.clear()
        self._retired.clear()
        self._visibility.clear()
        return block_ids

    def items(self) -> Iterator[tuple[VirtualPageId, BlockId]]:
        """Every reference the table holds, retired pages included."""
        yield from self._blocks.items()
        yield from self._retired.items()

    def block_counts(self) -> Counter[BlockId]:
        """How many references of this table name each block."""
        return Counter(block_id for _, block_id in self.items())

    # -- slot visibility ----------------------------------------------------------------------------------
    def set_visibility(self, page_id: VirtualPageId, slot_mask: Sequence[bool]) -> None:
        self.block(page_id)
        if len(slot_mask) != self.page_size:
            raise ControlError(f"slot mask has {len(slot_mask)} entries, the page size is {self.page_size}")
        visible = [bool(v) for v in slot_mask]
        self.version += 1
        if all(visible):
            self._visibility.pop(page_id, None)
        else:
            self._visibility[page_id] = visible

    def visibility(self, page_id: VirtualPageId) -> list[bool] | None:
        """The page's slot visibility, or None when every slot is visible."""
        return self._visibility.get(page_id)

    def copy_visibility(self, src_ids: Sequence[VirtualPageId], dst_ids: Sequence[VirtualPageId]) -> None:
        self.version += 1
        for src, dst in zip(src_ids, dst_ids):
            if src in self._visibility:
                self._visibility[dst] = list(self._visibility[src])

    def has_hidden_slots(self, page_ids: Iterable[VirtualPageId]) -> bool:
        return bool(self._visibility) and any(p in self._visibility for p in page_ids)

    def evict_all(self) -> list[BlockId]:
        """remove_all for an eviction: later uses of the ids it unmapped say so (KV_EVICTED)."""
        self._evicted_below = self._next_id
        return self.remove_all()

    def _unknown(self, page_id: object) -> str:
        if isinstance(page_id, int) and 0 <= page_id < self._evicted_below:
            return f"{KV_EVICTED}: page {page_id} was dropped when the instance was preempted without swap space"
        if isinstance(page_id, int) and 0 <= page_id < self._next_id:
            return f"page {page_id} was already freed"
        return f"unknown page id {page_id!r}"

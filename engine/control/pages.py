"""The KV storage pool: physical device pages, host swap slots, and reference-counted blocks over them.

A *block* is one page's worth of KV wherever it currently lives: on the device (it owns one physical
PageId) or in host memory (it owns one swap slot). Page tables, exports and the prefix cache hold blocks,
never physical pages, so swapping a block out and back in (to a possibly different page) remaps every
holder at once.

Invariants:
- a block with refcount n > 0 owns exactly one of (a page, a swap slot); at refcount 0 it is gone and the
  page or slot is free again (this is the only way a page returns to the free list, apart from swap-out);
- a page is owned by at most one block; so is a swap slot.
Swap ops are produced here and must go into the very next batch: a page freed by a swap-out may be reused in
that batch (swap_outs run first), while a slot freed by a swap-in is reusable only after `end_batch()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pie_server.engine.step import PageSwap
from pie_server.engine.types import PageId

BlockId = int
"""A refcounted page of KV content, independent of where it lives (internal to the control layer)."""


@dataclass
class _Block:
    refcount: int
    page: PageId | None  # resident on the device
    swap_slot: int | None = None  # swapped out to host memory


class PagePool:
    def __init__(self, num_pages: int, num_swap_slots: int = 0) -> None:
        if num_pages <= 0 or num_swap_slots < 0:
            raise ValueError("need num_pages > 0 and num_swap_slots >= 0")
        self.num_pages = num_pages
        self.num_swap_slots = num_swap_slots
        # LIFO free lists; reversed so that page 0 is handed out first.
        self._free_pages: list[PageId] = list(range(num_pages - 1, -1, -1))
        self._free_slots: list[int] = list(range(num_swap_slots - 1, -1, -1))
        self._slots_freed_this_batch: list[int] = []
        self._blocks: dict[BlockId, _Block] = {}
        self._next_block_id: BlockId = 0
        self.num_swapped_blocks = 0
        # Bumped whenever a live block changes its page (swap out or in): a list of pages() of the same blocks
        # stays right while it is unchanged (blocks a queued command uses are never freed, see PageTable).
        self.placement_version = 0

    # -- queries ------------------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_free_swap_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def refcount(self, block_id: BlockId) -> int:
        return self._get(block_id).refcount

    def first_shared(self, block_ids: Sequence[BlockId], start: int = 0) -> int:
        """The index of the first of block_ids[start:] with more than one reference (read-only), or -1."""
        blocks = self._blocks
        for index in range(start, len(block_ids)):
            if blocks[block_ids[index]].refcount > 1:
                return index
        return -1

    def is_resident(self, block_id: BlockId) -> bool:
        return self._get(block_id).page is not None

    def page(self, block_id: BlockId) -> PageId:
        page = self._get(block_id).page
        if page is None:
            raise RuntimeError(f"block {block_id} is swapped out; swap it in before using its page")
        return page

    def pages(self, block_ids: list[BlockId]) -> tuple[PageId, ...]:
        """The physical pages of resident blocks (the hot path of batch formation). A tuple: a decode's steps
        pass the same one on while its blocks stay put, and the executor converts and checks it once
        (engine/executor/step_inputs.py, PageArrays)."""
        blocks = self._blocks
        pages = tuple([blocks[block_id].page for block_id in block_ids])
        if None in pages:
            raise RuntimeError("a block is swapped out; swap it in before using its page")
        return pages  # type: ignore[return-value]

    # -- lifecycle ----------------------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[BlockId]:
        """New blocks with refcount 1, each on a free page. The caller checks num_free_pages first."""
        if num_blocks > len(self._free_pages):
            raise RuntimeError(f"asked for {num_blocks} pages with {len(self._free_pages)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id = self._next_block_id
            self._next_block_id += 1
            self._blocks[block_id] = _Block(refcount=1, page=self._free_pages.pop())
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_id: BlockId) -> None:
        self._get(block_id).refcount += 1

    def decref(self, block_id: BlockId) -> bool:
        """Drops one reference; returns True when that was the last one (the page or slot is free now)."""
        block = self._get(block_id)
        block.refcount -= 1
        if block.refcount > 0:
            return False
        del self._blocks[block_id]
        if block.page is not None:
            self._free_pages.append(block.page)
        else:
            assert block.swap_slot is not None
            self._free_slots.append(block.swap_slot)
            self.num_swapped_blocks -= 1
        return True

    # -- swapping -----------------------------------------------------------------------------------------
    def swap_out(self, block_id: BlockId) -> PageSwap:
        """Moves a resident block to a free swap slot; its page is free at once (see the module doc)."""
        block = self._get(block_id)
        if block.page is None or not self._free_slots:
            raise RuntimeError(f"cannot swap out block {block_id}: not resident or no free swap slot")
        swap = PageSwap(page_id=block.page, swap_slot=self._free_slots.pop())
        self.placement_version += 1
        self._free_pages.append(block.page)
        block.page, block.swap_slot = None, swap.swap_slot
        self.num_swapped_blocks += 1
        return swap

    def swap_in(self, block_id: BlockId) -> PageSwap:
        """Moves a swapped block onto a free page; its slot is reusable after end_batch()."""
        block = self._get(block_id)
        if block.swap_slot is None or not self._free_pages:
            raise RuntimeError(f"cannot swap in block {block_id}: not swapped or no free page")
        swap = PageSwap(page_id=self._free_pages.pop(), swap_slot=block.swap_slot)
        self.placement_version += 1
        self._slots_freed_this_batch.append(block.swap_slot)
        block.page, block.swap_slot = swap.page_id, None
        self.num_swapped_blocks -= 1
        return swap

    def end_batch(self) -> None:
        """The batch holding this round's swap-ins is formed: their slots may take swap-outs from now on."""
        self._free_slots.extend(self._slots_freed_this_batch)
        self._slots_freed_this_batch.clear()

    def _get(self, block_id: BlockId) -> _Block:
        block = self._blocks.get(block_id)
        if block is None:
            raise KeyError(f"block {block_id} does not exist (already freed?)")
        return block

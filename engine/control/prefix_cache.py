"""The prefix cache: page-aligned token blocks -> KV blocks, keyed by a hash chain.

Block i of a token sequence (tokens [i*page_size, (i+1)*page_size)) has the key
hash((key of block i-1, tokens of block i)), so a key names the whole prefix up to its block. Entries keep
their parent key and tokens, and a lookup compares them, so a hash collision is a miss, never wrong KV.

The cache holds one reference per cached block (the caller takes and drops it; this module only does the
bookkeeping). Eviction removes least recently used leaves (entries no other entry extends) whose block the
caller says is evictable (held by the cache alone); evicting leaves first keeps every cached chain reachable.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from pie_server.engine.control.pages import BlockId
from pie_server.engine.types import TokenId

_ROOT_KEY = 0


@dataclass
class _Entry:
    block_id: BlockId
    parent_key: int
    token_ids: tuple[TokenId, ...]
    num_children: int = 0


class PrefixCache:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._cached_blocks: set[BlockId] = set()
        self.num_queries = 0
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self._entries)

    def blocks(self) -> list[BlockId]:
        return [entry.block_id for entry in self._entries.values()]

    def lookup(self, token_ids: Sequence[TokenId], max_blocks: int | None = None) -> list[BlockId]:
        """The blocks of the longest cached page-aligned prefix (at most max_blocks); counts the query."""
        hit_keys = []
        for key, parent_key, block_tokens in self._keys(token_ids):
            if max_blocks is not None and len(hit_keys) >= max_blocks:
                break
            entry = self._entries.get(key)
            if entry is None or entry.parent_key != parent_key or entry.token_ids != block_tokens:
                break
            hit_keys.append(key)
        self._touch(hit_keys)
        self.num_queries += 1
        self.num_query_tokens += len(token_ids)
        self.num_hit_tokens += len(hit_keys) * self.page_size
        return [self._entries[key].block_id for key in hit_keys]

    def publish(self, token_ids: Sequence[TokenId], block_ids: Sequence[BlockId]) -> list[BlockId]:
        """Caches block i as holding tokens [i*page_size, (i+1)*page_size) for the full blocks given.
        Returns the blocks newly cached: the caller takes one reference for each."""
        added, touched = [], []
        for (key, parent_key, block_tokens), block_id in zip(self._keys(token_ids), block_ids):
            entry = self._entries.get(key)
            if entry is not None:
                if entry.parent_key != parent_key or entry.token_ids != block_tokens:
                    break  # a hash collision: this chain cannot be cached past here
                touched.append(key)  # already cached (perhaps in another block with equal content)
                continue
            if block_id in self._cached_blocks:
                break  # the block is cached under another prefix; one entry per block
            self._entries[key] = _Entry(block_id, parent_key, block_tokens)
            self._cached_blocks.add(block_id)
            if parent_key in self._entries:
                self._entries[parent_key].num_children += 1
            added.append(block_id)
            touched.append(key)
        self._touch(touched)
        return added

    def evict(self, is_evictable: Callable[[BlockId], bool], num_blocks: int) -> list[BlockId]:
        """Removes up to num_blocks evictable leaf entries, least recently used first; returns their blocks
        for the caller to drop the cache's reference."""
        evicted: list[BlockId] = []
        progress = True
        while len(evicted) < num_blocks and progress:
            progress = False
            for key in list(self._entries):
                entry = self._entries[key]
                if entry.num_children == 0 and is_evictable(entry.block_id):
                    self._remove(key)
                    evicted.append(entry.block_id)
                    progress = True
                    if len(evicted) == num_blocks:
                        break
        return evicted

    def evict_lru(self, is_evictable: Callable[[BlockId], bool], num_blocks: int) -> list[BlockId] | None:
        """Removes num_blocks evictable leaves (least recently used first, a chain counting whole: the entries
        evict() may take) and returns their blocks; None, removing nothing, when fewer can be removed. One pass
        over the least recently used entries that stops at num_blocks, so it costs about what it frees, not the
        cache's size (evict() and count_evictable() walk every entry, ~1 us each: 2.4 ms a call for a cache of
        5,700 pages, which every allocation paid once the pool was full of cached pages).

        One pass is enough because of the LRU order's invariant: every touch moves a chain from its root,
        deepest entry first, so an entry's descendants are all less recently used than it; by the time the pass
        reaches an entry, every child that can go has been chosen. The entries in use that the pass meets go to
        the most recently used end with their chains (see _touch_chains), so the next pass does not walk them
        again: a running agent's prompt pages would otherwise sit at the head of the order for its whole task."""
        if num_blocks <= 0:
            return []
        chosen: list[int] = []
        in_use: list[int] = []
        num_chosen_children: dict[int, int] = {}
        for key, entry in self._entries.items():
            if not is_evictable(entry.block_id):
                in_use.append(key)
            elif entry.num_children == num_chosen_children.get(key, 0):
                chosen.append(key)
                num_chosen_children[entry.parent_key] = num_chosen_children.get(entry.parent_key, 0) + 1
                if len(chosen) == num_blocks:
                    break
        else:
            self._touch_chains(in_use)
            return None
        block_ids = [self._entries[key].block_id for key in chosen]
        for key in chosen:  # never an ancestor of an entry in use: its count of children kept it out
            self._remove(key)
        self._touch_chains(in_use)
        return block_ids

    def count_evictable(self, is_evictable: Callable[[BlockId], bool]) -> int:
        """Entries evict() could remove (leaves first, so a chain of evictable entries counts whole)."""
        pinned_keys = {key for key, e in self._entries.items() if not is_evictable(e.block_id)}
        # An entry is removable iff no descendant is pinned: walk up from every pinned entry.
        blocked = set()
        for key in pinned_keys:
            while key in self._entries and key not in blocked:
                blocked.add(key)
                key = self._entries[key].parent_key
        return len(self._entries) - len(blocked)

    def clear(self) -> list[BlockId]:
        """Forgets every entry; returns their blocks for the caller to drop the cache's references."""
        block_ids = self.blocks()
        self._entries.clear()
        self._cached_blocks.clear()
        return block_ids

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._cached_blocks.discard(entry.block_id)
        parent = self._entries.get(entry.parent_key)
        if parent is not None:
            parent.num_children -= 1

    def _touch_chains(self, keys: list[int]) -> None:
        """Moves each key's entry and all its ancestors to the most recently used end, deeper entries first (the
        order's invariant). For entries in use: eviction must skip them, so they count as recently used (as in
        vLLM, whose queue of evictable blocks holds only blocks nobody uses)."""
        depth: dict[int, int] = {}
        for key in keys:
            path = []
            while key in self._entries and key not in depth:
                path.append(key)
                key = self._entries[key].parent_key
            level = depth.get(key, -1)  # -1 above a root
            for step in reversed(path):
                level += 1
                depth[step] = level
        for key in sorted(depth, key=depth.__getitem__, reverse=True):
            self._entries.move_to_end(key)

    def _touch(self, keys: list[int]) -> None:
        # Deepest first, so the root of a chain ends most recently used and leaves go first.
        for key in reversed(keys):
            self._entries.move_to_end(key)

    def _keys(self, token_ids: Sequence[TokenId]) -> Iterator[tuple[int, int, tuple[TokenId, ...]]]:
        """(key, parent key, tokens) of every full block of token_ids."""
        parent_key = _ROOT_KEY
        for start in range(0, len(token_ids) - self.page_size + 1, self.page_size):
            block_tokens = tuple(token_ids[start:start + self.page_size])
            key = hash((parent_key, block_tokens))
            yield key, parent_key, block_tokens
            parent_key = key

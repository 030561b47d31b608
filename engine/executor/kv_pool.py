"""The paged KV pool: one tensor per layer [num_pages, 2, page_size, Hkv, D], plus a host swap pool."""
from __future__ import annotations

import torch

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.step import PageCopy, PageSwap

_SWAP_BYTES_CAP = 1 << 30  # host memory for swapped-out pages when no swap space is configured


def kv_bytes_per_page(model: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_layers * 2 * page_size * model.num_kv_heads * model.head_dim * elem


def plan_num_pages(model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, num_ranks: int = 1) -> int:
    """The configured count, else the pages that fit the configured share of available host memory (on a
    GPU the executor measures instead: engine/executor/memory.py). num_ranks tensor-parallel CPU processes
    share that memory: each takes 1/num_ranks of it for its 1/num_ranks of every page (`model` is the rank's)."""
    if engine.num_pages is not None:
        return engine.num_pages
    per_page = kv_bytes_per_page(model, engine.page_size, dtype)
    budget = min(engine.max_cpu_kv_bytes, int(_available_host_bytes() * engine.kv_memory_fraction)) // num_ranks
    num_pages = budget // per_page
    if num_pages < 1:
        raise RuntimeError(f"not enough memory for one KV page ({per_page} bytes)")
    return num_pages


def plan_num_swap_slots(num_pages: int, bytes_per_page: int, swap_space_gib: float | None) -> int:
    """Host swap slots: swap_space_gib's worth of pages (at least one), else min(1 GiB, the pool's size)."""
    if swap_space_gib is None:
        return min(num_pages, max(1, _SWAP_BYTES_CAP // bytes_per_page))
    return max(1, int(swap_space_gib * (1 << 30)) // bytes_per_page)


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class KVPool:
    def __init__(self, model: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, num_swap_slots: int | None = None) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_pages, 2, page_size, model.num_kv_heads, model.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        per_page = kv_bytes_per_page(model, page_size, dtype)
        if num_swap_slots is None:
            num_swap_slots = plan_num_swap_slots(num_pages, per_page, None)
        self.num_swap_slots = num_swap_slots
        swap_shape = (model.num_layers, num_swap_slots, *shape[1:])
        self._swap = torch.empty(swap_shape, dtype=dtype, pin_memory=device.type == "cuda")

    def check_page(self, page_id: int) -> None:
        if not 0 <= page_id < self.num_pages:
            raise ValueError(f"page id {page_id} out of range [0, {self.num_pages})")

    def check_copy(self, c: PageCopy) -> int:
        """Validates one copy; returns its number of slots."""
        self.check_page(c.src_page_id)
        self.check_page(c.dst_page_id)
        n = self.page_size - c.src_offset if c.num_slots is None else c.num_slots
        if n < 0 or c.src_offset < 0 or c.dst_offset < 0 or max(c.src_offset, c.dst_offset) + n > self.page_size:
            raise ValueError(f"page copy out of range: {c}")
        return n

    def copy(self, copies: list[PageCopy]) -> None:
        """Copies in order (a later copy sees an earlier one's result). Call check_copy on all first."""
        for c in copies:
            n = self.check_copy(c)
            for cache in self.layers:
                cache[c.dst_page_id, :, c.dst_offset:c.dst_offset + n] = \
                    cache[c.src_page_id, :, c.src_offset:c.src_offset + n].clone()

    def swap_out(self, swaps: list[PageSwap]) -> None:
        for s in swaps:
            self.check_swap(s)
        for s in swaps:
            for layer, cache in enumerate(self.layers):
                self._swap[layer, s.swap_slot].copy_(cache[s.page_id])

    def swap_in(self, swaps: list[PageSwap]) -> None:
        for s in swaps:
            self.check_swap(s)
        for s in swaps:
            for layer, cache in enumerate(self.layers):
                cache[s.page_id].copy_(self._swap[layer, s.swap_slot], non_blocking=True)

    def check_swap(self, s: PageSwap) -> None:
        self.check_page(s.page_id)
        if not 0 <= s.swap_slot < self.num_swap_slots:
            raise ValueError(f"swap slot {s.swap_slot} out of range [0, {self.num_swap_slots})")

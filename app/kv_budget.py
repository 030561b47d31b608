"""Admission by KV pages: a request starts generating only once the pages it may need are reserved, so the
default path queues instead of over-committing the KV cache (which would force the engine to preempt).

A reservation is worst-case for its prompt and, per choice, its output up to `max_output_reserve` tokens;
generations longer than that rely on the engine's own preemption (swap to host memory). FIFO: a large
request at the head is not starved by small ones behind it.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class KVPolicy:
    num_pages: int  # pages the budget hands out (the pool, less a safety margin)
    page_size: int
    max_output_reserve: int = 1024  # output tokens reserved per choice at most

    def __post_init__(self) -> None:
        if self.num_pages <= 0 or self.page_size <= 0 or self.max_output_reserve <= 0:
            raise ValueError("num_pages, page_size and max_output_reserve must be positive")

    def pages_for(self, prompt_tokens: list[int], max_tokens: list[int], n: int) -> int:
        """Prompt pages once per prompt (choices share them), plus each choice's output and a tail page."""
        pages = 0
        for num_prompt, num_output in zip(prompt_tokens, max_tokens):
            pages += -(-num_prompt // self.page_size)
            pages += n * (-(-min(num_output, self.max_output_reserve) // self.page_size) + 1)
        return min(pages, self.num_pages)  # a request larger than the pool runs alone


class KVBudget:
    """An asyncio FIFO counting semaphore over pages (one event loop)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.num_free = num_pages
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, num_pages: int) -> None:
        if not 0 <= num_pages <= self.num_pages:
            raise ValueError(f"cannot reserve {num_pages} of {self.num_pages} pages")
        if not self._waiters and num_pages <= self.num_free:
            self.num_free -= num_pages
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (num_pages, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(num_pages)  # granted while being cancelled: give it back
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, num_pages: int) -> None:
        self.num_free += num_pages
        assert self.num_free <= self.num_pages, "released more pages than were reserved"
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.num_free:
            num_pages, future = self._waiters.popleft()
            if future.cancelled():
                continue
            self.num_free -= num_pages
            future.set_result(None)

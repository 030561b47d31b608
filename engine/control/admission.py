"""Admission by KV pages: a request starts generating only once the pages it may need are reserved, so the
default path queues instead of over-committing the KV cache (which would force the engine to preempt).

It lives in the control layer, beside the pages it counts: every front end reserves from the same Admission,
however many there are. A reservation is worst-case for its prompt and, per choice, its output up to
`max_output_reserve` tokens; longer generations rely on preemption (swap to host memory). FIFO: a large
request at the head is not starved by small ones behind it. Thread-safe; waiting is a concurrent Future.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Sequence


def pages_for(prompt_tokens: Sequence[int], max_tokens: Sequence[int], n: int, page_size: int,
              max_output_reserve: int, num_pages: int) -> int:
    """Prompt pages once per prompt (choices share them), plus each choice's output and a tail page; at most
    num_pages (a request larger than the budget runs alone)."""
    pages = 0
    for num_prompt, num_output in zip(prompt_tokens, max_tokens):
        pages += -(-num_prompt // page_size)
        pages += n * (-(-min(num_output, max_output_reserve) // page_size) + 1)
    return min(pages, num_pages)


class Admission:
    """A FIFO counting semaphore over num_pages pages."""

    @classmethod
    def for_pool(cls, num_pool_pages: int) -> "Admission":
        """Over all but 1/32 of a KV pool: instances may also hold pages that no reservation counts."""
        return cls(max(1, num_pool_pages - num_pool_pages // 32))

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError("admission needs at least one page")
        self.num_pages = num_pages
        self._lock = threading.Lock()
        self._num_free = num_pages
        self._waiters: collections.deque[tuple[int, Future[None]]] = collections.deque()

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_waiting(self) -> int:
        """Reservations waiting (cancelled ones leave at the next release)."""
        with self._lock:
            return sum(1 for _, future in self._waiters if not future.cancelled())

    def reserve(self, num_pages: int) -> Future[None]:
        """Resolves once num_pages are reserved for the caller. Cancel the Future to stop waiting; if cancel()
        returns False the pages were granted meanwhile and must be released."""
        if not 0 <= num_pages <= self.num_pages:
            raise ValueError(f"cannot reserve {num_pages} of {self.num_pages} pages")
        future: Future[None] = Future()
        future.add_done_callback(self._after_cancel)
        with self._lock:
            self._waiters.append((num_pages, future))
            granted = self._grant()
        _settle(granted)
        return future

    def _after_cancel(self, future: Future[None]) -> None:
        """A waiter that gave up may have blocked smaller ones behind it."""
        if future.cancelled():
            with self._lock:
                granted = self._grant()
            _settle(granted)

    def release(self, num_pages: int) -> None:
        with self._lock:
            self._num_free += num_pages
            if self._num_free > self.num_pages:
                raise AssertionError("released more pages than were reserved")
            granted = self._grant()
        _settle(granted)

    def _grant(self) -> list[Future[None]]:
        """Takes the head reservations that fit (skipping cancelled ones); their Futures are settled by the
        caller after the lock is released (callbacks may call back in)."""
        granted = []
        while self._waiters:
            num_pages, future = self._waiters[0]
            if not future.cancelled() and num_pages > self._num_free:
                break
            self._waiters.popleft()
            if future.set_running_or_notify_cancel():  # False: cancelled, it leaves the queue
                self._num_free -= num_pages
                granted.append(future)
        return granted


def _settle(granted: list[Future[None]]) -> None:
    for future in granted:
        future.set_result(None)

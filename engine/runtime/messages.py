"""Messages an instance sends to its client, and the mailbox that carries them (and client input).

A Mailbox is filled by any thread and drained either by a blocking `get` (tests, CLI) or by
`await aget()` from one asyncio loop (the HTTP layer); the producer never blocks.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from dataclasses import dataclass
from typing import Generic, TypeVar, Union


@dataclass(frozen=True)
class Text:
    """A text chunk for the client (channel 0: the main stream; others e.g. one per choice)."""

    text: str
    channel: int = 0


@dataclass(frozen=True)
class Event:
    """A JSON event for the client (the JSON text, validated by the host)."""

    json: str


@dataclass(frozen=True)
class Terminated:
    """The last message of every instance: ok, or the error that ended it."""

    ok: bool
    error: str | None = None


Message = Union[Text, Event, Terminated]
T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._listeners: list = []

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()
            waiter, self._waiter = self._waiter, None
            listeners, self._listeners = self._listeners, []
        if waiter is not None:
            loop, future = waiter
            _waker(loop).wake(future)
        for listener in listeners:
            listener()

    def __len__(self) -> int:
        return len(self._items)

    def try_get(self) -> T | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def get(self, timeout: float | None = None) -> T:
        """Block until an item comes; raises TimeoutError after timeout seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no message within the timeout")
            return self._items.popleft()

    async def aget(self) -> T:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            await future

    def notify_once(self, listener) -> bool:  # type: ignore[no-untyped-def]
        """Call listener() (from the producer's thread) at the next put; False (and no call) if items are
        already waiting."""
        with self._cond:
            if self._items:
                return False
            self._listeners.append(listener)
            return True

    def cancel_listener(self, listener) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)


class _LoopWaker:
    """Wakes futures of one asyncio loop from other threads, one self-pipe write per burst: a decode step
    puts one message into each of many mailboxes, and each call_soon_threadsafe costs a syscall and a
    loop iteration. Invariant: `_futures` is non-empty exactly while one flush is scheduled on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._futures: list[asyncio.Future[None]] = []

    def wake(self, future: asyncio.Future[None]) -> None:
        with self._lock:
            first = not self._futures
            self._futures.append(future)
        if first:
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed: nobody waits any more
                with self._lock:
                    self._futures.clear()
                raise

    def _flush(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            _wake(future)


# One waker per live loop (a cache keyed weakly, so a closed loop's waker goes with it).
_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()
_wakers_lock = threading.Lock()


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    with _wakers_lock:
        waker = _wakers.get(loop)
        if waker is None:
            waker = _wakers[loop] = _LoopWaker(loop)
        return waker


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

"""Messages an instance sends to its client, and the mailbox that carries them (and client input).

A Mailbox is filled by any thread and drained either by a blocking `get` (tests, CLI) or by
`await aget()` from one asyncio loop (the HTTP layer); `put` never blocks. An instance's outbox counts the bytes
it holds (`message_bytes`), so that the guest's sends can wait while a slow client has not read enough
(api_basic.py: backpressure instead of unbounded server memory).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar, Union


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


def message_bytes(message: object) -> int:
    """The payload bytes of a message to the client (what the outbox's bound counts)."""
    if isinstance(message, Text):
        return len(message.text.encode())
    if isinstance(message, Event):
        return len(message.json.encode())
    return 0


class Mailbox(Generic[T]):
    def __init__(self, size: Callable[[T], int] | None = None) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._listeners: list = []
        self._size = size  # None: items are not counted (num_bytes stays 0)
        self.num_bytes = 0  # the sizes of the items held (written under _cond)
        self._room_listeners: list[tuple[int, Callable[[], None]]] = []  # (bound, listener)

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            if self._size is not None:
                self.num_bytes += self._size(item)
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
            item = self._items.popleft() if self._items else None
            roomy = self._took(item)
        _call(roomy)
        return item

    def get(self, timeout: float | None = None) -> T:
        """Block until an item comes; raises TimeoutError after timeout seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no message within the timeout")
            item = self._items.popleft()
            roomy = self._took(item)
        _call(roomy)
        return item

    async def aget(self) -> T:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    roomy = self._took(item)
                    break
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            await future
        _call(roomy)
        return item

    def notify_when_below(self, bound: int, listener: Callable[[], None]) -> bool:
        """Call listener() (from the consumer's thread) once the items held total fewer than bound bytes;
        False (and no call) if they already do."""
        with self._cond:
            if self.num_bytes < bound:
                return False
            self._room_listeners.append((bound, listener))
            return True

    def _took(self, item: T | None) -> list[Callable[[], None]]:
        """Under _cond: count an item out; the room listeners whose bound is now met (to call unlocked)."""
        if item is None or self._size is None:
            return []
        self.num_bytes -= self._size(item)
        if not self._room_listeners:
            return []
        roomy = [listener for bound, listener in self._room_listeners if self.num_bytes < bound]
        self._room_listeners = [(b, f) for b, f in self._room_listeners if self.num_bytes >= b]
        return roomy

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


def _call(listeners: list[Callable[[], None]]) -> None:
    for listener in listeners:
        listener()


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

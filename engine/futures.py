"""Settling a concurrent Future that its waiter may have cancelled meanwhile; and Signal, a Future without a
Condition for the per-token wake-ups of a decode's caller."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, Callable

log = logging.getLogger(__name__)
_PENDING, _CANCELLED, _FINISHED = "PENDING", "CANCELLED_AND_NOTIFIED", "FINISHED"  # Future's own state names


def settle(future: Future[Any], value: Any = None, error: BaseException | None = None) -> bool:
    """Sets the result (or the error); False if the future was already settled or cancelled."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        return False
    return True


class Signal(Future):
    """A Future that nobody blocks on: settled once from any thread, its callbacks run by the settling thread.

    concurrent.futures.Future makes a threading.Condition (an RLock and a waiters' deque) per instance and takes
    it in every method; a front end makes one waiter per streaming request per token (decoding.wait_any), and on
    the 2-core CPU that creation and done() were a tenth of the inferlet scheduler thread's time under load. A
    plain Lock guards the state change and the callback list; done() reads the state alone (one attribute). A
    result() or exception() asked before the end waits on an Event made then (only tests drive a generator so).
    Not for concurrent.futures.wait or as_completed."""

    def __init__(self) -> None:  # no Future.__init__: no Condition
        self._lock = threading.Lock()
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        self._ended: threading.Event | None = None  # made by the first result()/exception() that must wait

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def running(self) -> bool:
        return False

    def cancel(self) -> bool:
        return self._settle(_CANCELLED, None, None) or self._state == _CANCELLED

    def set_result(self, result: Any) -> None:
        if not self._settle(_FINISHED, result, None):
            raise InvalidStateError(f"{self!r} is already {self._state}")

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._settle(_FINISHED, None, exception):
            raise InvalidStateError(f"{self!r} is already {self._state}")

    def set_running_or_notify_cancel(self) -> bool:
        return not self.cancelled()

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        with self._lock:
            if self._state == _PENDING:
                self._done_callbacks.append(fn)
                return
        _call(fn, self)

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        if self._state == _PENDING:
            with self._lock:
                if self._state == _PENDING and self._ended is None:
                    self._ended = threading.Event()
                ended = self._ended
            if ended is not None and not ended.wait(timeout):
                raise TimeoutError()
        if self._state == _CANCELLED:
            raise CancelledError()

    def _settle(self, state: str, result: Any, exception: BaseException | None) -> bool:
        with self._lock:
            if self._state != _PENDING:
                return False
            self._result, self._exception, self._state = result, exception, state
            callbacks, self._done_callbacks = self._done_callbacks, []
            ended = self._ended
        if ended is not None:
            ended.set()
        for fn in callbacks:
            _call(fn, self)
        return True

    def __repr__(self) -> str:
        return f"<Signal {self._state}>"


def _call(fn: Callable[[Future[Any]], object], future: Future[Any]) -> None:
    try:
        fn(future)
    except Exception:  # as Future does: a callback's failure is logged, the others still run
        log.exception("exception calling callback for %r", future)

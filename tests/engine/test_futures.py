"""engine/futures.py: settle(), and Signal behaving as a Future for everything the runtime asks of one."""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future

import pytest

from pie_server.engine.futures import Signal, settle


def test_a_signal_is_settled_once_and_runs_its_callbacks_then() -> None:
    signal, seen = Signal(), []
    assert isinstance(signal, Future) and not signal.done() and not signal.cancelled()
    signal.add_done_callback(lambda f: seen.append(("early", f.result())))
    with pytest.raises(TimeoutError):
        signal.result(timeout=0.01)
    assert settle(signal, 7)
    assert not settle(signal, 8)  # already settled: refused, the first value stays
    signal.add_done_callback(lambda f: seen.append(("late", f.result())))  # runs at once
    assert seen == [("early", 7), ("late", 7)] and signal.done() and signal.exception() is None


def test_an_error_and_a_cancel() -> None:
    failed = Signal()
    settle(failed, error=ValueError("no"))
    assert isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError, match="no"):
        failed.result()
    cancelled, seen = Signal(), []
    cancelled.add_done_callback(seen.append)
    assert cancelled.cancel() and cancelled.cancel() and cancelled.cancelled() and seen == [cancelled]
    assert not settle(cancelled, 1)
    with pytest.raises(CancelledError):
        cancelled.result()
    assert not failed.cancel()


def test_a_failing_callback_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    signal, seen = Signal(), []
    signal.add_done_callback(lambda f: 1 / 0)
    signal.add_done_callback(seen.append)
    signal.set_result(None)
    assert seen == [signal] and "exception calling callback" in caplog.text


def test_result_waits_for_another_thread() -> None:
    signal = Signal()
    threading.Timer(0.05, signal.set_result, args=("late",)).start()
    assert signal.result(timeout=5) == "late"
    failed = Signal()
    threading.Timer(0.05, failed.set_exception, args=(KeyError("k"),)).start()
    assert isinstance(failed.exception(timeout=5), KeyError)


def test_callbacks_added_while_another_thread_settles_each_run_once() -> None:
    for _ in range(200):
        signal, calls = Signal(), []
        settler = threading.Thread(target=signal.set_result, args=(1,))
        settler.start()
        for _ in range(5):
            signal.add_done_callback(calls.append)
        settler.join()
        assert len(calls) == 5

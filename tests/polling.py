"""Waiting in tests for something another thread or process makes true."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "the condition") -> None:
    """Returns once condition() is true; fails the test after timeout_s, saying what it waited for."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.005)

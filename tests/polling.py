"""Waiting in tests for something another thread or process makes true."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Returns once condition() is true; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)

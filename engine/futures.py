"""Settling a concurrent Future that its waiter may have cancelled meanwhile."""
from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any


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

"""The SDK's exceptions and the one place where host errors become them.

Every fallible host call returns `result<_, string>`; componentize-py raises its error case as
`componentize_py_types.Err(message)`. The SDK turns that into HostError so inferlet code only ever sees
ordinary Python exceptions.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from componentize_py_types import Err

T = TypeVar("T")


class PieError(Exception):
    """Base class of every error the SDK raises."""


class HostError(PieError):
    """The host refused a call (bad page id, over quota, host not allowed, ...); the message says why."""


# The host's errors about KV that the last resort of preemption dropped start with this (the server's
# engine.control.api.KV_EVICTED): the instance lives on, and a Context computes its KV again.
KV_EVICTED = "KV evicted"


def is_kv_evicted(error: BaseException) -> bool:
    return isinstance(error, HostError) and str(error).startswith(KV_EVICTED)


class UsageError(PieError):
    """The inferlet was launched with bad arguments (raised by pie_sdk.ArgumentParser)."""


def call(fn: Callable[..., T], *args: object) -> T:
    """Call a binding, turning its Err(message) into HostError(message)."""
    try:
        return fn(*args)
    except Err as err:
        raise HostError(str(err.value)) from None

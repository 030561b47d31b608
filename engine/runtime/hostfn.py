"""How host functions are declared: a WIT name, a Python implementation and the result's schema.

An implementation is called as `impl(instance_state, *decoded_args)` in the scheduler thread and returns
either the result value, or a generator (a HostTask) that yields Futures while it waits, or (the lean path
of hot calls, with `finish` set) one Future: the call's value is then `finish(future.result())`. It reports a bad
argument by raising GuestError (or letting ControlError through): for a `result<...>` function the message
becomes the `err` value; any other exception is a host bug and stops the instance with that message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pie_server.engine.runtime.config import API_VERSION, WIT_PACKAGE


class GuestError(Exception):
    """The guest passed something invalid: returned to it as an err string."""


@dataclass(frozen=True)
class HostFunction:
    interface: str  # e.g. "kv"
    name: str  # e.g. "allocate-pages", "[method]decoder.add"
    impl: Callable[..., Any]
    schema: Any  # values.Schema of the result, None for a function without result
    params: tuple[Any, ...] | None = None  # schemas of the parameters: compiled decoding for hot calls
    # whether impl reads InstanceState.context_ptr (the store context, e.g. to make resources); building it
    # costs a ctypes cast per call, so hot functions that never need it say False
    needs_context: bool = True
    # for an impl that returns a Future: its result -> the call's value (raises like impl; see above)
    finish: Callable[[Any], Any] | None = None

    @property
    def instance_name(self) -> str:
        return f"{WIT_PACKAGE}/{self.interface}@{API_VERSION}"

    @property
    def returns_result(self) -> bool:
        return isinstance(self.schema, tuple) and self.schema[0] == "result"


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise GuestError(message)

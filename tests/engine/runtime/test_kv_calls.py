"""The kv and prefix-cache host functions never hold the scheduler thread for a reply: over an engine core
(a Control with call_later) they yield the pending call's Future, so other instances run meanwhile."""
from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from pie_server.engine.runtime import api_kv
from tests.engine.runtime.conftest import MODEL

INSTANCE = SimpleNamespace(id="a")


class SlowRemote:
    """Answers no call until the test settles it, like an engine core busy with a step."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...], Future[Any]]] = []

    def call_later(self, method: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.sent.append((method, args, future))
        return future


def _impl(name: str, control: Any) -> Any:
    functions = api_kv.functions(SimpleNamespace(control=control, model=MODEL))  # type: ignore[arg-type]
    return next(f.impl for f in functions if f.name == name)


def test_value_calls_yield_the_pending_reply_and_finish_with_it() -> None:
    remote = SlowRemote()
    cases = [("lookup", (INSTANCE, [5, 6, 7]), ([3], 4), ("ok", {"page-ids": [3], "num-tokens": 4})),
             ("publish", (INSTANCE, [5, 6, 7, 8], [3]), None, ("ok", None)),
             ("share-pages", (INSTANCE, [3]), [9], ("ok", [9])),
             ("free-pages", (INSTANCE, [3]), None, ("ok", None)),
             ("mask-slots", (INSTANCE, 3, [True] * MODEL.page_size), None, ("ok", None))]
    for name, args, reply, expected in cases:
        task = _impl(name, remote)(*args)
        waited = next(task)  # returns at once: the call is on its way, nothing answered yet
        method, sent_args, future = remote.sent[-1]
        assert waited is future and not future.done() and sent_args[0] == "a"
        try:
            task.send(reply)
        except StopIteration as stop:
            assert stop.value == expected, name
        else:
            raise AssertionError(f"{name} did not finish with its reply")

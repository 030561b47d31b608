"""Tenants do not see each other inside the runtime: exported KV pages (engine/runtime/api_kv.py), the key-value
store and broadcasts (engine/runtime/api_basic.py), called as the host calls them."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Iterator

import pytest

from pie_server.engine.control.api import ControlError
from pie_server.engine.runtime import api_basic, api_kv
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.types import InstanceId
from tests.engine.runtime.conftest import MODEL
from tests.engine.runtime.fakes import ByteTokenizer, FakeControl
from tests.engine.runtime.test_generate import drive

Calls = dict[str, Callable[..., Any]]


@pytest.fixture
def world(control: FakeControl) -> Iterator[tuple[Calls, InstanceState, InstanceState, InstanceState]]:
    """The host's kv and store/messaging calls; instances of tenant a (two) and of tenant b."""
    host = Host(control=control, tokenizer=ByteTokenizer(), model=MODEL, config=RuntimeConfig(),
                call_later=lambda delay, fn: None, run_blocking=lambda fn: Future())
    calls = {f"{f.interface}.{f.name}": f.impl for f in (*api_kv.functions(host), *api_basic.functions(host))}
    instances = [InstanceState(id=InstanceId(name), program_hash="", arguments=(), tenant=tenant, deadline=1e18)
                 for name, tenant in (("a1", "a"), ("a2", "a"), ("b1", "b"))]
    for inst in instances:
        control.open_instance(inst.id)
    yield calls, *instances  # type: ignore[misc]


def _pages(calls: Calls, inst: InstanceState, num_pages: int) -> list[int]:
    tag, page_ids = drive(calls["kv.allocate-pages"](inst, num_pages))
    assert tag == "ok"
    return page_ids


def test_a_tenants_exports_are_its_own(world: Any, control: FakeControl) -> None:
    calls, a1, a2, b1 = world
    calls["kv.export-pages"](a1, _pages(calls, a1, 2), "context")
    assert calls["kv.list-exports"](a1) == ["context"] and calls["kv.list-exports"](b1) == []
    with pytest.raises(ControlError) as refused:
        calls["kv.import-pages"](b1, "context")
    assert "'context'" in str(refused.value)  # the inferlet's own name, not the scoped one
    with pytest.raises(ControlError):
        calls["kv.unexport-pages"](b1, "context")
    calls["kv.export-pages"](b1, _pages(calls, b1, 1), "context")  # the same name: b's own export
    tag, imported = calls["kv.import-pages"](a2, "context")  # another instance of a: a's export
    assert tag == "ok" and len(imported) == 2
    calls["kv.unexport-pages"](b1, "context")
    assert calls["kv.list-exports"](a1) == ["context"] and calls["kv.list-exports"](b1) == []
    assert len(control.list_exports()) == 1


def test_the_store_and_broadcasts_are_per_tenant(world: Any) -> None:
    calls, a1, a2, b1 = world
    assert calls["store.set"](a1, "secret", "a's") == ("ok", None)
    assert calls["store.get"](a2, "secret") == "a's"
    assert calls["store.get"](b1, "secret") is None and calls["store.list-keys"](b1, "") == []
    assert calls["store.delete"](b1, "secret") is False and calls["store.get"](a1, "secret") == "a's"
    for inst in (a2, b1):
        calls["messaging.subscribe"](inst, "news")
    assert calls["messaging.broadcast"](a1, "news", "for a") == ("ok", None)
    assert a2.broadcasts.try_get() == ("news", "for a")
    assert b1.broadcasts.try_get() is None

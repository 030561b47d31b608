"""kv.page-usage: the host function over the real controller (forks, exports and other instances share
pages; shared pages are counted once and reported as shared), and its place on the engine core's wire."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from pie_server.engine.control.api import ControlError, call_later
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.runtime import api_kv
from tests.engine.control.fake_executor import FakeExecutor
from tests.engine.core.test_remote_control import Core
from tests.engine.runtime.conftest import MODEL

A, B = SimpleNamespace(id="a", tenant="t"), SimpleNamespace(id="b", tenant="t")


@pytest.fixture
def controller() -> Iterator[Controller]:
    executor = FakeExecutor(num_pages=16, page_size=MODEL.page_size, vocab_size=100)
    made = Controller(executor, ControlConfig(vocab_size=100))
    yield made
    for inst in (A, B):
        made.close_instance(inst.id)
    stats = made.stats()
    assert stats.num_free_pages == stats.num_pages  # every reference counted above was given back


def _usage(controller: Controller, inst: Any, page_ids: list[int] | None) -> Any:
    functions = api_kv.functions(SimpleNamespace(control=controller, model=MODEL))  # type: ignore[arg-type]
    impl = next(f.impl for f in functions if f.name == "page-usage")
    task = impl(inst, page_ids)
    future = next(task)
    try:
        task.send(future.result(timeout=0))
    except StopIteration as stop:
        return stop.value
    raise AssertionError("page-usage did not finish with its reply")


def _counts(num_ids: int, num_physical: int, num_shared: int) -> tuple[str, dict[str, int]]:
    return ("ok", {"num-page-ids": num_ids, "num-physical-pages": num_physical, "num-shared-pages": num_shared})


def test_shared_pages_count_once_and_as_shared(controller: Controller) -> None:
    controller.open_instance(A.id)
    controller.open_instance(B.id)
    pages = controller.allocate_pages(A.id, 3).result(timeout=0)
    assert _usage(controller, A, None) == _counts(3, 3, 0)
    forked = controller.share_pages(A.id, pages[:2])  # a fork of the first two
    assert _usage(controller, A, None) == _counts(5, 3, 2)
    assert _usage(controller, A, [pages[0], forked[0]]) == _counts(2, 1, 1)
    assert _usage(controller, A, [pages[2]]) == _counts(1, 1, 0)  # private: writable
    controller.export_pages(A.id, [pages[2]], "doc")
    assert _usage(controller, A, [pages[2]]) == _counts(1, 1, 1)  # an export holds it too
    imported = controller.import_pages(B.id, "doc")
    controller.unexport_pages("doc")
    assert _usage(controller, B, None) == _counts(1, 1, 1)  # still held by A
    controller.free_pages(A.id, [pages[2]])
    assert _usage(controller, B, imported) == _counts(1, 1, 0)
    controller.free_pages(A.id, forked)
    assert _usage(controller, A, None) == _counts(2, 2, 0)
    with pytest.raises(ControlError, match="already freed"):
        controller.page_usage(A.id, [forked[0]])


def test_page_usage_travels_the_engine_cores_wire(tmp_path: Path) -> None:
    core = Core(tmp_path, FakeExecutor(num_pages=32, page_size=MODEL.page_size))
    try:
        remote = core.remote
        remote.open_instance("a")
        pages = remote.allocate_pages("a", 2).result(5)
        call_later(remote, "share_pages", "a", pages[:1]).result(5)
        assert call_later(remote, "page_usage", "a", None).result(5) == (3, 2, 1)
        assert call_later(remote, "page_usage", "a", [pages[1]]).result(5) == (1, 1, 0)
        with pytest.raises(ControlError, match="unknown page id"):
            call_later(remote, "page_usage", "a", [99]).result(5)
        remote.close_instance("a")
    finally:
        core.close()

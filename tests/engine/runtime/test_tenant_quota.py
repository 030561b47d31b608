"""Per-tenant quotas (engine/runtime/tenant_quota.py) and per-launch limits within the runtime's maxima."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import wasmtime

from pie_server.engine.control.api import ControlError, call_later
from pie_server.engine.runtime.config import InstanceLimits, LimitError
from pie_server.engine.runtime.messages import Terminated, Text
from pie_server.engine.runtime.runtime import Runtime
from pie_server.engine.runtime.tenant_quota import QuotaControl, TenantPages, TenantQuotaError
from pie_server.engine.types import InstanceId
from tests.engine.runtime.conftest import make_runtime, wat
from tests.engine.runtime.fakes import FakeControl

# Grows its memory by 8 MiB once: ok within the limit, a trap beyond it.
GROW_8_MIB = wasmtime.wat2wasm("""
(component
  (core module $M
    (memory (export "memory") 1)
    (func (export "run") (result i32)
      (if (i32.eq (memory.grow (i32.const 128)) (i32.const -1)) (then unreachable))
      (i32.store8 (i32.const 64) (i32.const 0))
      (i32.const 64)))
  (core instance $m (instantiate $M))
  (func (export "run") (result (result (error string)))
    (canon lift (core func $m "run") (memory (core memory $m "memory"))))
)""")


@pytest.fixture
def quota_control(control: FakeControl) -> Iterator[QuotaControl]:
    pages = TenantPages(max_per_tenant=5)
    for instance, tenant in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        control.open_instance(InstanceId(instance))
        pages.open(InstanceId(instance), tenant)
    yield QuotaControl(control, pages)


def test_a_tenants_instances_share_one_page_quota(quota_control: QuotaControl, control: FakeControl) -> None:
    a1, a2, b1 = InstanceId("a1"), InstanceId("a2"), InstanceId("b1")
    first = quota_control.allocate_pages(a1, 3).result(timeout=5)
    with pytest.raises(ControlError, match="tenant's page quota .* hold 3 pages, asked for 3 more, its limit is 5"):
        quota_control.allocate_pages(a2, 3)
    assert len(quota_control.allocate_pages(b1, 5).result(timeout=5)) == 5  # another tenant: its own quota
    assert len(quota_control.allocate_pages(a2, 2).result(timeout=5)) == 2
    with pytest.raises(ControlError, match="page quota"):  # a fork takes pages of the quota too
        quota_control.share_pages(a1, first[:1])
    call_later(quota_control, "free_pages", a1, first[:2]).result(timeout=5)  # as api_kv frees
    assert quota_control.pages.held("a") == 3
    assert len(call_later(quota_control, "share_pages", a1, first[2:]).result(timeout=5)) == 1
    assert quota_control.pages.held("a") == 4
    quota_control.close_instance(a1)
    quota_control.pages.close(a1)  # as the runtime does when an instance ends: its pages come back
    assert quota_control.pages.held("a") == 2 and quota_control.pages.held("b") == 5
    assert control.num_free_pages == control.info.num_pages - 7


def test_allocations_in_flight_count_until_they_fail(quota_control: QuotaControl, control: FakeControl) -> None:
    control.open_instance(InstanceId("other"))  # of no tenant the quota knows: it only fills the pool
    control.allocate_pages(InstanceId("other"), control.info.num_pages - 2).result(timeout=5)
    waiting = quota_control.allocate_pages(InstanceId("a1"), 3)  # 2 pages free: it waits
    with pytest.raises(ControlError, match=r"hold 0 pages \(\+3 being allocated\), asked for 3 more"):
        quota_control.allocate_pages(InstanceId("a2"), 3)
    quota_control.close_instance(InstanceId("a1"))
    quota_control.pages.close(InstanceId("a1"))
    assert isinstance(waiting.exception(timeout=5), ControlError)  # failed: it holds nothing
    control.close_instance(InstanceId("other"))
    assert quota_control.pages.held("a") == 0
    assert len(quota_control.allocate_pages(InstanceId("a2"), 5).result(timeout=5)) == 5  # the whole quota
    assert quota_control.pages.held("a") == 5


def _wait_for_hello(runtime: Runtime, tenant: str) -> object:
    handle = runtime.launch(runtime.load(wat("messages.wat")), tenant=tenant)  # allocates 3 pages, then says hello
    assert handle.get_message(timeout=10) == Text("hello")
    return handle


def test_the_page_quota_through_the_runtime(control: FakeControl, tmp_path: Path) -> None:
    runtime = make_runtime(control, tmp_path, max_pages_per_tenant=4)
    try:
        handles = [_wait_for_hello(runtime, tenant) for tenant in ("a", "a", "b")]
        assert runtime.tenant_pages is not None
        assert runtime.tenant_pages.held("a") == 3  # the second instance's allocation was refused
        assert runtime.tenant_pages.held("b") == 3
        assert control.num_free_pages == control.info.num_pages - 6
        for handle in handles:
            handle.send("bye")  # type: ignore[attr-defined]
            assert handle.messages(timeout=10)[-1] == Terminated(ok=True)  # type: ignore[attr-defined]
        assert runtime.tenant_pages.held("a") == 0 and runtime.tenant_pages.held("b") == 0
        assert control.num_free_pages == control.info.num_pages
    finally:
        runtime.close()


def test_the_instance_quota_refuses_one_more_until_one_ends(control: FakeControl, tmp_path: Path) -> None:
    runtime = make_runtime(control, tmp_path, max_instances_per_tenant=1)
    try:
        program = runtime.load(wat("messages.wat"))
        first = runtime.launch(program, tenant="a")
        with pytest.raises(TenantQuotaError, match="already runs 1 instances"):
            runtime.launch(program, tenant="a")
        other = runtime.launch(program, tenant="b")  # another tenant is not held back
        first.kill()
        first.messages(timeout=10)
        deadline = time.monotonic() + 10
        while runtime.tenant_instances.count("a") and time.monotonic() < deadline:
            time.sleep(0.01)
        again = runtime.launch(program, tenant="a")
        for handle in (other, again):
            handle.kill()
            handle.messages(timeout=10)
    finally:
        runtime.close()


def test_per_launch_limits_only_tighten(control: FakeControl, tmp_path: Path) -> None:
    runtime = make_runtime(control, tmp_path, max_pages_per_instance=8)  # 20 s, 32 MiB (the fixture's)
    opened: list[tuple[str, int | None]] = []
    open_instance = control.open_instance
    control.open_instance = lambda iid, max_pages=None: (opened.append((iid, max_pages)), open_instance(iid))[1]
    try:
        grow = runtime.load(GROW_8_MIB)
        for limits, field, maximum in ((InstanceLimits(time_budget_s=21), "time_budget_s", 20.0),
                                       (InstanceLimits(memory_limit_bytes=64 << 20), "memory_limit_bytes", 32 << 20),
                                       (InstanceLimits(max_pages=9), "max_pages", 8)):
            with pytest.raises(LimitError) as refused:
                runtime.launch(grow, limits=limits)
            assert (refused.value.field, refused.value.maximum) == (field, maximum)
        assert runtime.launch(grow).messages(timeout=10) == [Terminated(ok=True)]
        small = runtime.launch(grow, limits=InstanceLimits(memory_limit_bytes=4 << 20, max_pages=2))
        end = small.messages(timeout=10)[-1]
        assert isinstance(end, Terminated) and not end.ok and "trapped" in (end.error or "")
        assert [pages for iid, pages in opened if iid == small.id] == [2]
        assert opened[0][1] == 8  # the runtime's own quota where the launch sets none
        budget = runtime.launch(runtime.load(wat("infinite_loop.wat")), limits=InstanceLimits(time_budget_s=0.3))
        end = budget.messages(timeout=10)[-1]
        assert isinstance(end, Terminated) and "exceeded its time budget" in (end.error or "") \
            and "0.3 s" in (end.error or "")
    finally:
        runtime.close()

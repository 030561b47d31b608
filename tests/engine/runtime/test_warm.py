"""Warm instances (engine/runtime/warm.py): started ahead, parked in runtime.arguments, taken by launches."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest

from pie_server.engine.runtime.messages import Terminated, Text
from pie_server.engine.runtime.runtime import Runtime
from pie_server.engine.runtime.tenant_quota import TenantQuotaError
from tests.engine.runtime.conftest import make_runtime, wat
from tests.engine.runtime.fakes import FakeControl
from tests.polling import wait_until as _wait_until


def wait_until(condition: Callable[[], bool]) -> None:
    _wait_until(condition, timeout_s=10.0)


def warm_runtime(runtime: Runtime, num_instances: int) -> str:
    program = runtime.load(wat("started_ahead.wat"))
    runtime.keep_warm(program, num_instances)
    wait_until(lambda: runtime.warm.num_parked(program) == num_instances)
    return program


def test_a_launch_takes_a_parked_instance_and_a_replacement_starts(runtime: Runtime, control: FakeControl) -> None:
    program = warm_runtime(runtime, 2)
    assert runtime.num_instances == 2 and control.num_free_pages == control.info.num_pages
    handle = runtime.launch(program, ["first request"], tenant="alice")
    assert handle.get_message(timeout=10) == Text("ahead")
    assert handle.get_message(timeout=10) == Text("first request")
    assert runtime.warm.num_taken == 1
    wait_until(lambda: runtime.warm.num_parked(program) == 2)  # the replacement, besides the other one
    handle.send("bye")
    assert handle.messages(timeout=10) == [Terminated(ok=True)]
    wait_until(lambda: runtime.num_instances == 2)


def test_without_warm_instances_or_with_other_limits_a_launch_starts_cold(runtime: Runtime) -> None:
    program = runtime.load(wat("started_ahead.wat"))
    cold = runtime.launch(program, ["x"])
    assert [cold.get_message(timeout=10), cold.get_message(timeout=10)] == [Text("cold"), Text("x")]
    cold.kill()
    runtime.keep_warm(program, 1)
    wait_until(lambda: runtime.warm.num_parked(program) == 1)
    other_limits = runtime.launch(program, ["y"], time_budget_s=5.0)
    assert other_limits.get_message(timeout=10) == Text("cold")
    assert runtime.warm.num_taken == 0 and runtime.warm.num_parked(program) == 1
    other_limits.kill()


def test_the_time_budget_runs_from_the_launch(control: FakeControl, tmp_path: Path) -> None:
    runtime = make_runtime(control, tmp_path, time_budget_s=0.5)
    try:
        program = warm_runtime(runtime, 1)
        time.sleep(0.8)  # parked for longer than its budget
        handle = runtime.launch(program, ["late"])
        assert [handle.get_message(timeout=10), handle.get_message(timeout=10)] == [Text("ahead"), Text("late")]
        started = time.monotonic()
        end = handle.messages(timeout=10)[-1]
        assert isinstance(end, Terminated) and not end.ok and "time budget" in (end.error or "")
        assert 0.3 < time.monotonic() - started < 2.0
    finally:
        runtime.close()


def test_warm_instances_count_for_a_tenant_from_their_launch(control: FakeControl, tmp_path: Path) -> None:
    runtime = make_runtime(control, tmp_path, max_instances_per_tenant=1)
    try:
        program = warm_runtime(runtime, 2)  # belong to nobody: alice may still launch one
        first = runtime.launch(program, ["a"], tenant="alice")
        assert first.get_message(timeout=10) == Text("ahead")
        with pytest.raises(TenantQuotaError):
            runtime.launch(program, ["b"], tenant="alice")
        assert runtime.warm.num_taken == 1  # the refused launch left its warm instance parked
        assert runtime.launch(program, ["c"], tenant="bob").get_message(timeout=10) == Text("ahead")
        first.kill()
        assert first.messages(timeout=10)[-1] == Terminated(ok=False, error="killed by the client")
        wait_until(lambda: _launches(runtime, program, "alice"))
    finally:
        runtime.close()


def _launches(runtime: Runtime, program: str, tenant: str) -> bool:
    try:
        runtime.launch(program, ["again"], tenant=tenant).kill()
    except TenantQuotaError:
        return False
    return True


def test_close_stops_parked_instances(control: FakeControl, tmp_path: Path) -> None:
    runtime = make_runtime(control, tmp_path)
    warm_runtime(runtime, 3)
    started = time.monotonic()
    runtime.close()
    assert time.monotonic() - started < 5 and runtime.num_instances == 0
    wait_until(lambda: len(control.closed) == 3)  # each told the control layer it ended


def test_keep_warm_refuses_an_unknown_program(runtime: Runtime) -> None:
    with pytest.raises(KeyError):
        runtime.keep_warm("0" * 64, 1)

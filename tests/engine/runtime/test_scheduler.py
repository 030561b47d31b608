"""Who the scheduler polls next (engine/runtime/scheduler.py), with scripted guests instead of Wasm: each poll
is one slice that runs out (an epoch yield) until the guest's last one, after which it waits for good."""
from __future__ import annotations

import math
import time
from typing import Iterator

import pytest
import wasmtime

from pie_server.engine.runtime import scheduler as scheduler_module
from pie_server.engine.runtime.instance import HostTask, InstanceState
from pie_server.engine.runtime.scheduler import Scheduler
from tests.polling import wait_until


class ScriptedCall:
    """Stands in for an instance's call future: records each poll in `order`."""

    def __init__(self, inst: InstanceState, num_slices: int, order: list[str]) -> None:
        self.inst, self.remaining, self.order = inst, num_slices, order

    def poll(self, _ticks: int) -> bool:
        self.order.append(self.inst.id)
        self.remaining -= 1
        if self.remaining == 0:
            self.inst.task = HostTask(None, "wait", None, None)  # type: ignore[arg-type]  # never answered
        return False

    def delete(self) -> None:
        pass


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    sched = Scheduler(wasmtime.Engine(), epoch_tick_s=0.005, on_stop=lambda *_: None)
    yield sched
    sched.shutdown()


def _start_together(sched: Scheduler, ids: str, num_slices: int) -> list[str]:
    """Adds one scripted instance per id in one scheduler event (none is polled before all are added); the
    poll order once every slice has run."""
    order: list[str] = []

    def add_all() -> None:
        for instance_id in ids:
            inst = InstanceState(id=instance_id, program_hash="", arguments=(), tenant="t",  # type: ignore[arg-type]
                                 deadline=math.inf)
            sched.add(inst, lambda inst: setattr(inst, "call", ScriptedCall(inst, num_slices, order)))
    sched.post(add_all)
    wait_until(lambda: len(order) == len(ids) * num_slices, timeout_s=10, what="every slice")
    time.sleep(0.02)  # no further poll may come
    return order


def test_instances_started_together_run_their_starts_oldest_first(scheduler: Scheduler) -> None:
    """Young instances keep the head of the queue: each start runs to its wait before the next one begins,
    instead of all of them sharing the thread slice by slice until all are done."""
    assert _start_together(scheduler, "abc", num_slices=3) == list("aaabbbccc")


def test_an_instance_past_its_young_time_shares_slices_round_robin(scheduler: Scheduler,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that computes longer than a start goes to the back after each slice, so none starves."""
    monkeypatch.setattr(scheduler_module, "YOUNG_RUN_S", 0.0)
    assert _start_together(scheduler, "abc", num_slices=3) == list("abcabcabc")

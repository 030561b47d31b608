"""StoreReaper (engine/runtime/reaper.py): what is dropped is deleted on the reaper's thread, in order, and close()
waits for it; the scheduler hands every finished instance's store to it."""
from __future__ import annotations

import math
import threading

import wasmtime

from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.reaper import StoreReaper
from pie_server.engine.runtime.scheduler import Scheduler
from tests.engine.runtime.test_scheduler import ScriptedCall
from tests.polling import wait_until


class Tracked:
    """Stands in for a wasmtime Store: records on which thread it was closed."""
    deleted_on: list[tuple[int, str]] = []

    def __init__(self, number: int) -> None:
        self.number = number

    def close(self) -> None:
        Tracked.deleted_on.append((self.number, threading.current_thread().name))


def test_stores_are_closed_on_the_reapers_thread_in_order() -> None:
    Tracked.deleted_on = []
    reaper = StoreReaper()
    for i in range(5):
        reaper.drop(Tracked(i))
    reaper.close()
    assert Tracked.deleted_on == [(i, "inferlet-reaper") for i in range(5)]


def test_a_finished_instances_store_is_deleted_by_the_reaper() -> None:
    """Scheduler._stop hands the store over; it is deleted on the reaper's thread, not the scheduler's."""
    Tracked.deleted_on = []
    stopped: list[bool] = []
    sched = Scheduler(wasmtime.Engine(), epoch_tick_s=0.005, on_stop=lambda inst, ok, error: stopped.append(ok))
    try:
        inst = InstanceState(id="a", program_hash="", arguments=(), tenant="t",  # type: ignore[arg-type]
                             deadline=math.inf)

        def start(inst: InstanceState) -> None:
            inst.call, inst.store = ScriptedCall(inst, 1, []), Tracked(1)

        sched.post(lambda: sched.add(inst, start))
        wait_until(lambda: inst.store is not None, timeout_s=5, what="the instance's start")
        sched.post(lambda: sched._stop(inst, True, None))
        wait_until(lambda: bool(Tracked.deleted_on), timeout_s=5, what="the store's deletion")
        assert stopped == [True] and inst.store is None
        assert Tracked.deleted_on == [(1, "inferlet-reaper")]
    finally:
        sched.shutdown()

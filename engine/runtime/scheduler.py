"""The execution model: one scheduler thread drives every instance over wasmtime's async C API.

Each instance's `run()` is an async call future. Polling it runs the guest until it finishes, waits in a
host call (a HostTask waiting on a Future), or reaches an epoch yield point (every `epoch_tick_s` of guest
CPU time). A completed Future posts the instance back to the scheduler, which advances the task and polls
the instance again. Thus 1000 instances issue their forward calls in one round and they land in one batch.
(docs/decisions/execution-model.md has the measurements against one thread per instance.)

Invariants: all wasmtime objects and all InstanceState fields are touched only by the scheduler thread;
other threads talk to it with post(). An instance is stopped only between polls (a kill during a poll is
deferred); stopping deletes its call future (cancelling the guest), then its store.
"""
from __future__ import annotations

import collections
import ctypes
import heapq
import itertools
import logging
import threading
import time
import types
from concurrent.futures import Future
from typing import Any, Callable

import wasmtime

from engine.control.api import ControlError
from engine.runtime import ffi_async, values
from engine.runtime.hostfn import GuestError, HostFunction
from engine.runtime.instance import HostTask, InstanceState

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: wasmtime.Engine, epoch_tick_s: float,
                 on_stop: Callable[[InstanceState, bool, str | None], None]) -> None:
        self.engine = engine
        self._on_stop = on_stop
        self._cond = threading.Condition()
        self._events: collections.deque[Callable[[], None]] = collections.deque()
        self._runnable: collections.deque[InstanceState] = collections.deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._by_slot: dict[int, InstanceState] = {}
        self._current: InstanceState | None = None
        self._stopping = False
        self.num_polls = 0
        self._continuation_ready = ffi_async.CONTINUATION_T(lambda env: True)
        self._continuation_task = ffi_async.CONTINUATION_T(self._task_continuation)
        self._thread = threading.Thread(target=self._loop, name="inferlet-scheduler", daemon=True)
        self._ticker = threading.Thread(target=self._tick, args=(epoch_tick_s,), name="inferlet-epoch",
                                        daemon=True)
        self._thread.start()
        self._ticker.start()

    # ------------------------------------------------------------------ called from any thread
    def post(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._events.append(fn)
            self._cond.notify()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run fn in the scheduler thread after delay_s (timers are only created there: post() first)."""
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._timer_seq), fn))

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self._ticker.join(timeout=5)

    @property
    def num_instances(self) -> int:
        return len(self._by_slot)

    # ------------------------------------------------------------------ scheduler thread
    def add(self, inst: InstanceState, start: Callable[[InstanceState], None]) -> None:
        self._by_slot[inst.slot] = inst
        try:
            start(inst)
        except Exception as error:  # a bad component, a failed store setup: the instance ends
            self._stop(inst, False, f"failed to start: {error}")
            return
        self.call_later(max(0.0, inst.deadline - time.monotonic()),
                        lambda: self.kill(inst, "exceeded its time budget"))
        self._runnable.append(inst)

    def kill(self, inst: InstanceState, reason: str) -> None:
        if inst.finished:
            return
        if self._current is inst:
            inst.kill_reason = inst.kill_reason or reason
            return
        self._stop(inst, False, reason)

    def make_callback(self, fn: HostFunction) -> Any:
        """The C callback serving one WIT import for every instance."""
        decoders = None if fn.params is None else [values.compile_decoder(p) for p in fn.params]

        def callback(_data: Any, context: Any, _functype: Any, args: Any, num_args: int, results: Any,
                     num_results: int, error_out: Any, continuation: Any) -> None:
            inst = self._current
            try:
                assert inst is not None, "host call outside of a poll"
                inst.context_ptr = context
                arguments = (values.decode_args(args, num_args) if decoders is None
                             else values.decode_args_with(decoders, args, num_args))
                outcome = _call_impl(fn, inst, arguments)
                if isinstance(outcome, types.GeneratorType):
                    task = HostTask(outcome, fn.name, fn.schema, results if num_results else None)
                    inst.task = task
                    self._advance(inst, task, None, None)
                    continuation[0].callback = self._continuation_task
                    continuation[0].env = inst.slot
                    return
                if num_results:
                    values.encode_into(fn.schema, outcome, results)
                continuation[0].callback = self._continuation_ready
            except BaseException as error:  # never let an exception unwind into C
                message = f"host error in {fn.interface}.{fn.name}: {error!r}"
                log.exception(message)
                error_out[0] = wasmtime.WasmtimeError(message)._consume()
        return ffi_async.ASYNC_FUNC_T(callback)

    def _task_continuation(self, env: int) -> bool:
        inst = self._by_slot.get(env)
        task = inst.task if inst is not None else None
        if task is None or not task.done:
            return False
        if task.internal_error is not None:
            inst.kill_reason = inst.kill_reason or task.internal_error  # type: ignore[union-attr]
            return False
        try:
            if task.results_ptr is not None:
                values.encode_into(task.schema, task.value, task.results_ptr)
        except BaseException as error:
            inst.kill_reason = f"host error encoding the result of {task.name}: {error!r}"  # type: ignore[union-attr]
            return False
        inst.task = None  # type: ignore[union-attr]
        return True

    def _advance(self, inst: InstanceState, task: HostTask, value: Any, error: BaseException | None) -> None:
        """Run the task's generator until it waits on a pending Future or returns."""
        while True:
            try:
                waited = task.gen.throw(error) if error is not None else task.gen.send(value)
            except StopIteration as stop:
                task.done, task.value = True, stop.value
                return
            except (GuestError, ControlError, ValueError) as failure:
                task.done = True
                if isinstance(task.schema, tuple) and task.schema[0] == "result":
                    task.value = ("err", str(failure))
                else:
                    task.internal_error = f"host error in {task.name}: {failure}"
                return
            except BaseException as failure:
                log.exception("host task %s failed", task.name)
                task.done, task.internal_error = True, f"host error in {task.name}: {failure!r}"
                return
            futures = waited if isinstance(waited, list) else [waited]
            pending = [f for f in futures if not f.done()]
            if not pending:
                value, error = _outcome(waited)
                continue
            remaining = [len(pending)]

            def on_done(_: Future, inst: InstanceState = inst, task: HostTask = task,
                        waited: Any = waited) -> None:
                with self._cond:
                    remaining[0] -= 1
                    if remaining[0]:
                        return
                self.post(lambda: self._resume(inst, task, waited))
            for future in pending:
                future.add_done_callback(on_done)
            return

    def _resume(self, inst: InstanceState, task: HostTask, waited: Any) -> None:
        if inst.finished or inst.task is not task:
            return
        value, error = _outcome(waited)
        self._advance(inst, task, value, error)
        if task.done:
            self._runnable.append(inst)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._events and not self._runnable and not self._stopping:
                    timeout = self._timers[0][0] - time.monotonic() if self._timers else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopping:
                    break
                events, self._events = self._events, collections.deque()
            for event in events:
                self._run_guarded(event)
            self._fire_timers()
            for _ in range(len(self._runnable)):
                self._step(self._runnable.popleft())
        for inst in list(self._by_slot.values()):
            self._stop(inst, False, "the runtime shut down")

    def _run_guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("scheduler event failed")

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            self._run_guarded(fn)

    def _step(self, inst: InstanceState) -> None:
        if inst.finished or (inst.task is not None and not inst.task.done):
            return
        self._current = inst
        try:
            self.num_polls += 1
            inst.store.set_epoch_deadline(1)  # a fresh time slice: no instant yield after a long wait
            finished = inst.call.poll()
        finally:
            self._current = None
        if inst.kill_reason is not None:
            self._stop(inst, False, inst.kill_reason)
        elif finished:
            self._finish_call(inst)
        elif inst.task is None or inst.task.done:  # an epoch yield, or a task that completed at once
            if time.monotonic() > inst.deadline:
                self._stop(inst, False, "exceeded its time budget")
            else:
                self._runnable.append(inst)

    def _finish_call(self, inst: InstanceState) -> None:
        outcome = inst.call_outcome
        assert outcome is not None
        try:
            raw = outcome()
        except wasmtime.WasmtimeError as error:
            self._stop(inst, False, _describe_trap(error))
            return
        if inst.phase == "instantiating":
            self._start_run(inst, raw)
            return
        tag, message = values.decode_raw_val(raw)
        self._stop(inst, tag == "ok", None if tag == "ok" else f"inferlet returned an error: {message}")

    def _start_run(self, inst: InstanceState, component_instance: Any) -> None:
        inst.call.delete()
        inst.component_instance = component_instance
        func = component_instance.get_func(inst.store, "run")
        if func is None:
            self._stop(inst, False, "the component does not export run: func() -> result<_, string>")
            return
        inst.call, inst.call_outcome = ffi_async.call_run_async(func, inst.store)
        inst.phase = "running"
        self._runnable.append(inst)

    def _stop(self, inst: InstanceState, ok: bool, error: str | None) -> None:
        if inst.finished:
            return
        inst.phase = "finished"
        if inst.task is not None and not inst.task.done:
            inst.task.gen.close()
        inst.task = None
        if inst.call is not None:
            inst.call.delete()  # cancels a suspended guest before its store goes
        inst.call = inst.call_outcome = inst.component_instance = None
        inst.store = None
        inst.context_ptr = None
        self._by_slot.pop(inst.slot, None)
        self._on_stop(inst, ok, error)

    def _tick(self, tick_s: float) -> None:
        while not self._stopping:
            time.sleep(tick_s)
            self.engine.increment_epoch()


def _call_impl(fn: HostFunction, inst: InstanceState, args: list[Any]) -> Any:
    try:
        return fn.impl(inst, *args)
    except (GuestError, ControlError, ValueError) as failure:
        if fn.returns_result:
            return ("err", str(failure))
        raise


def _outcome(waited: Any) -> tuple[Any, BaseException | None]:
    if isinstance(waited, list):
        return [f.exception() or f.result() for f in waited], None
    error = waited.exception()
    return (None, error) if error is not None else (waited.result(), None)


def _describe_trap(error: wasmtime.WasmtimeError) -> str:
    text = str(error)
    if "epoch" in text or "interrupt" in text:
        return f"stopped: exceeded its time budget ({text.splitlines()[0]})"
    return f"trapped: {text}"

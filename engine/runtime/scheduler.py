"""The execution model: one scheduler thread drives every instance over wasmtime's async C API.

Each instance's `run()` is an async call future. Polling it runs the guest until it finishes, waits in a
host call (a HostTask waiting on a Future), or reaches an epoch yield point (every `epoch_tick_s` of guest
CPU time). A completed Future posts the instance back to the scheduler, which advances the task and polls
the instance again. Thus 1000 instances issue their forward calls in one round and they land in one batch.
(docs/decisions/execution-model.md has the measurements against one thread per instance.)

Order of polls (a multilevel feedback queue): an instance whose wait ended (a host call answered, a message
arrived) is polled before any other; the others (new instances, slices that ran out) wait in one queue whose
head is polled one at a time, with every due event and woken instance served between two such polls. An
instance keeps the head of that queue while it is young (its polls add up to less than `YOUNG_RUN_S`), so
instances that start together run their starts one after the other, oldest first, instead of sharing the
thread in slices until all of them are done; a guest that computes longer falls back to round-robin slices.
(docs/decisions/execution-model.md, "Who is polled next".)

Invariants: all wasmtime objects and all InstanceState fields are touched only by the scheduler thread;
other threads talk to it with post(). An instance is stopped only between polls (a kill during a poll is
deferred); stopping deletes its call future (cancelling the guest), then its store. A background instance (a
warm one until its launch, engine/runtime/warm.py) is polled only when no event, no completion and no other
instance waits.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import threading
import time
import types
from concurrent.futures import Future
from typing import Any, Callable

import wasmtime

from pie_server.engine.runtime import ffi_async, hostcalls, values
from pie_server.engine.runtime.hostfn import HostFunction
from pie_server.engine.runtime.instance import HostTask, InstanceState
from pie_server.engine.runtime.reaper import StoreReaper

log = logging.getLogger(__name__)
MAX_GUEST_TAIL_CHARS = 500  # of the guest's own output, quoted in a trap's message
YOUNG_RUN_S = 0.05  # an instance polled for less than this in all keeps the head of the queue (its start)


class Scheduler:
    def __init__(self, engine: wasmtime.Engine, epoch_tick_s: float,
                 on_stop: Callable[[InstanceState, bool, str | None], None]) -> None:
        self.engine = engine
        self._on_stop = on_stop
        self._cond = threading.Condition()
        self._events: collections.deque[Callable[[], None]] = collections.deque()
        self._sleeping = False  # the loop waits on _cond: a poster must notify (read without the lock)
        self._woken: collections.deque[InstanceState] = collections.deque()  # waits that ended: polled first
        self._runnable: collections.deque[InstanceState] = collections.deque()  # the head is polled, one a turn
        self._background: collections.deque[InstanceState] = collections.deque()  # runnable, polled when idle
        # (instance, future) of lean-path waits whose future completed (appended by any thread)
        self._completed: collections.deque[tuple[InstanceState, Future]] = collections.deque()
        # slot -> the instance's LeanTask (made at add(); its DoneFlag continues every suspended call)
        self._lean_tasks: dict[int, hostcalls.LeanTask] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._by_slot: dict[int, InstanceState] = {}
        self._current: InstanceState | None = None
        self._deferred: InstanceState | None = None  # the instance whose lean call awaits hostcalls.run
        self._stopping = False
        self.num_polls = 0
        self._ready = ffi_async.DoneFlag(done=True)  # the continuation of calls answered at once
        # Clear while the loop sleeps (no guest runs then; written by the scheduler thread only): the epoch ticker
        # sleeps too, so an idle server, warm instances parked in it or not, does not wake 1 / epoch_tick_s
        # times a second for nothing.
        self._live = threading.Event()
        self._reaper = StoreReaper()
        self._thread = threading.Thread(target=self._loop, name="inferlet-scheduler", daemon=True)
        self._ticker = threading.Thread(target=self._tick, args=(epoch_tick_s,), name="inferlet-epoch",
                                        daemon=True)
        self._thread.start()
        self._ticker.start()

    # ------------------------------------------------------------------ called from any thread
    def post(self, fn: Callable[[], None]) -> None:
        # deque.append is atomic; the loop sets _sleeping under the lock before it re-checks _events and
        # waits, so either it sees this event or we see _sleeping and notify
        self._events.append(fn)
        if self._sleeping:
            with self._cond:
                self._cond.notify()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run fn in the scheduler thread after delay_s (timers are only created there: post() first)."""
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._timer_seq), fn))

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._live.set()  # the ticker sees _stopping
        # (the loop re-checks _stopping before every wait)
        self._thread.join(timeout=5)
        self._ticker.join(timeout=5)
        self._reaper.close()

    @property
    def num_instances(self) -> int:
        return len(self._by_slot)

    # ------------------------------------------------------------------ scheduler thread
    def add(self, inst: InstanceState, start: Callable[[InstanceState], None]) -> None:
        self._by_slot[inst.slot] = inst
        self._live.set()
        self._lean_tasks[inst.slot] = hostcalls.lean_task(lambda done: self._post_completion(inst, done))
        try:
            start(inst)
        except Exception as error:  # a bad component, a failed store setup: the instance ends
            self._stop(inst, False, f"failed to start: {error}")
            return
        self._start_deadline(inst)
        (self._background if inst.background else self._runnable).append(inst)  # new: the queue's back

    def launch_warm(self, inst: InstanceState) -> None:
        """A warm instance was launched (its deadline set): from now on polled as any other, and stopped at
        its deadline."""
        inst.background = False
        inst.polled_s = 0.0  # its request's start is young again (prepare() ran in idle time)
        if inst in self._background:
            self._background.remove(inst)
            self._runnable.append(inst)
        self._start_deadline(inst)

    def _start_deadline(self, inst: InstanceState) -> None:
        if math.isfinite(inst.deadline):  # a warm instance's runs from its launch
            self.call_later(max(0.0, inst.deadline - time.monotonic()),
                            lambda: self.kill(inst, inst.over_budget_reason))

    def _requeue(self, inst: InstanceState) -> None:
        """inst's wait ended: it is polled before the queue's head."""
        (self._background if inst.background else self._woken).append(inst)

    def _requeue_yielded(self, inst: InstanceState) -> None:
        """inst is new or its slice ran out: back to the queue, at its head while young."""
        if inst.background:
            self._background.append(inst)
        elif inst.polled_s < YOUNG_RUN_S:
            self._runnable.appendleft(inst)
        else:
            self._runnable.append(inst)

    def kill(self, inst: InstanceState, reason: str) -> None:
        if inst.finished:
            return
        if self._current is inst:
            inst.kill_reason = inst.kill_reason or reason
            return
        self._stop(inst, False, reason)

    def make_callback(self, fn: HostFunction) -> Any:
        """The C callback serving one WIT import for every instance (pointers arrive as ints)."""
        decode = values.compile_args(fn.params) if fn.params is not None else values.decode_args
        encode = values.compile_encoder(fn.schema)
        if fn.finish is not None:
            return self._lean_callback(fn, decode, encode)
        impl, returns_result, needs_context = fn.impl, fn.returns_result, fn.needs_context
        ready = self._ready.image
        context_pointer, set_continuation = ffi_async.context_pointer, ffi_async.set_continuation

        def callback(_data: int, context: int, _functype: int, args: int, num_args: int, results: int,
                     num_results: int, error_out: int, continuation: int) -> None:
            inst = self._current
            try:
                if inst is None:
                    raise RuntimeError("host call outside of a poll")
                if needs_context:
                    inst.context_ptr = context_pointer(context)
                arguments = decode(args, num_args)
                try:
                    outcome = impl(inst, *arguments)
                except hostcalls.GUEST_FAULTS as failure:
                    if not returns_result:
                        raise
                    outcome = ("err", str(failure))
                if type(outcome) is types.GeneratorType:
                    set_continuation(continuation, self._start_task(inst, fn, outcome, results if num_results
                                                                    else None, encode))
                    return
                if num_results and encode is not None:
                    encode(outcome, results)
                set_continuation(continuation, ready)
            except BaseException as error:  # never let an exception unwind into C
                self._callback_failed(fn, error, error_out)
        return ffi_async.RAW_ASYNC_FUNC_T(callback)

    def _callback_failed(self, fn: HostFunction, error: BaseException, error_out: int) -> None:
        message = f"host error in {fn.interface}.{fn.name}: {error!r}"
        log.exception(message)
        ffi_async.set_error(error_out, message)

    # ------------------------------------------------------------------ generator host tasks
    def _start_task(self, inst: InstanceState, fn: HostFunction, gen: Any, results: int | None,
                    encode: Any) -> bytes:
        """In the callback: run the generator until it waits; the continuation image (the DoneFlag)."""
        flag = self._lean_tasks[inst.slot].flag
        flag.byte[0] = 0  # type: ignore[union-attr]
        task = hostcalls.Task(gen, fn.name, fn.schema, results, encode=encode, flag=flag)
        inst.task = task
        self._advance(inst, task, None, None)
        if task.done:
            error = hostcalls.finish_generator(task)
            if error is not None:  # the guest stays suspended; the instance stops after this poll
                inst.kill_reason = inst.kill_reason or error
        return flag.image  # type: ignore[union-attr]

    def _advance(self, inst: InstanceState, task: HostTask, value: Any, error: BaseException | None) -> None:
        """Run the task's generator until it waits on a pending Future or returns."""
        def wake(waited: Any) -> None:
            self.post(lambda: self._resume(inst, task, waited))
        hostcalls.advance(task, value, error, wake, self._cond)

    def _resume(self, inst: InstanceState, task: HostTask, waited: Any) -> None:
        if inst.finished or inst.task is not task:
            return
        value, error = hostcalls.outcome(waited)
        self._advance(inst, task, value, error)
        if task.done:
            failure = hostcalls.finish_generator(task)  # type: ignore[arg-type]
            if failure is not None:
                self._stop(inst, False, failure)
            else:
                self._requeue(inst)

    # ---------------------------------------------------------- lean waits: one Future, no generator
    def _lean_callback(self, fn: HostFunction, decode: Any, encode: Any) -> Any:
        """The callback of a lean function: decode and suspend; the impl runs right after the poll
        (hostcalls.run from _step, on the scheduler's own stack rather than the instance's fiber)."""
        tasks, set_continuation = self._lean_tasks, ffi_async.set_continuation

        def callback(_data: int, _context: int, _functype: int, args: int, num_args: int, results: int,
                     num_results: int, error_out: int, continuation: int) -> None:
            inst = self._current
            try:
                if inst is None:
                    raise RuntimeError("host call outside of a poll")
                arguments = decode(args, num_args)
                task = tasks[inst.slot]
                task.fn, task.arguments, task.encode = fn, arguments, encode
                task.results_ptr = results if num_results else None
                task.done, task.internal_error = False, None
                task.flag.byte[0] = 0  # type: ignore[union-attr]
                inst.task = task
                self._deferred = inst
                set_continuation(continuation, task.flag.image)  # type: ignore[union-attr]
            except BaseException as error:  # never let an exception unwind into C
                self._callback_failed(fn, error, error_out)
        return ffi_async.RAW_ASYNC_FUNC_T(callback)

    def _post_completion(self, inst: InstanceState, future: Future) -> None:
        """Any thread: a lean wait's Future completed (deque.append is atomic; then wake as post() does)."""
        self._completed.append((inst, future))
        if self._sleeping:
            with self._cond:
                self._cond.notify()

    def _take_completions(self) -> None:
        """Encode the values of completed lean waits and poll each instance at once, while its objects
        are still in the caches (with a thousand instances, polling them after all the others cost ~25%)."""
        completed = self._completed
        for _ in range(len(completed)):
            inst, future = completed.popleft()
            task = inst.task
            if task is None or task.future is not future or inst.phase == "finished":  # type: ignore[attr-defined]
                continue  # the instance was stopped while it waited
            task.future = None  # type: ignore[attr-defined]
            try:
                value = task.fn.finish(future.result())  # type: ignore[attr-defined]
                task.encode(value, task.results_ptr)  # type: ignore[attr-defined]
            except BaseException as failure:
                hostcalls.complete(task, failure=failure)  # type: ignore[arg-type]
                self._after_lean(inst, task)  # type: ignore[arg-type]
                continue
            task.flag.byte[0] = 1  # type: ignore[attr-defined]
            task.done = True
            self._step(inst)

    def _after_lean(self, inst: InstanceState, task: hostcalls.LeanTask) -> None:
        """A lean call ended at once or failed: poll again, or stop the instance on an internal error."""
        if task.internal_error is not None:
            self._stop(inst, False, task.internal_error)
        else:
            self._requeue(inst)

    def _loop(self) -> None:
        while True:
            if not self._has_work():
                self._wait()
            if self._stopping:
                break
            events = self._events
            for _ in range(len(events)):
                self._run_guarded(events.popleft())
            if self._completed:
                self._take_completions()
            if self._timers:
                self._fire_timers()
            woken = self._woken
            for _ in range(len(woken)):
                self._step(woken.popleft())
            if self._runnable:
                self._step(self._runnable.popleft())
            elif self._background and not (self._woken or self._events or self._completed):
                self._step(self._background.popleft())
        for inst in list(self._by_slot.values()):
            self._stop(inst, False, "the runtime shut down")

    def _has_work(self) -> bool:
        """An event, a completion or an instance to poll (background ones included) waits."""
        return bool(self._events or self._completed or self._woken or self._runnable or self._background)

    def _wait(self) -> None:
        """Sleep until an event is posted, a timer is due or shutdown."""
        with self._cond:
            self._sleeping = True
            self._live.clear()
            try:
                while not (self._has_work() or self._stopping):
                    timeout = self._timers[0][0] - time.monotonic() if self._timers else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
            finally:
                self._sleeping = False
                self._live.set()

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
        task = inst.task
        if inst.phase == "finished" or (task is not None and not task.done):
            return
        self._current = inst
        started = time.perf_counter()
        try:
            self.num_polls += 1
            finished = inst.call.poll(1)  # a fresh time slice (epoch deadline): no instant yield after a wait
        finally:
            self._current = None
            inst.polled_s += time.perf_counter() - started
        deferred = self._deferred is inst  # a lean call suspended in this poll: its impl runs now
        self._deferred = None
        if inst.kill_reason is not None:
            self._stop(inst, False, inst.kill_reason)
        elif deferred:
            if hostcalls.run(inst.task, inst):  # type: ignore[arg-type]
                self._after_lean(inst, inst.task)  # type: ignore[arg-type]
        elif finished:
            self._finish_call(inst)
        elif inst.task is None or inst.task.done:  # an epoch yield, or a task that completed at once
            if time.monotonic() > inst.deadline:
                self._stop(inst, False, inst.over_budget_reason)
            else:
                self._requeue_yielded(inst)

    def _finish_call(self, inst: InstanceState) -> None:
        outcome = inst.call_outcome
        assert outcome is not None
        try:
            raw = outcome()
        except wasmtime.WasmtimeError as error:
            log.warning("instance %s trapped: %s", inst.id, error)  # the backtrace: for the operator only
            self._stop(inst, False, describe_trap(str(error), bytes(inst.log)))
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
        self._requeue_yielded(inst)  # instantiation is part of the start: young instances go on at once

    def _stop(self, inst: InstanceState, ok: bool, error: str | None) -> None:
        if inst.finished:
            return
        inst.phase = "finished"
        if inst.call is not None:
            inst.call.delete()  # cancels a suspended guest before its store goes (and before its DoneFlag)
        if inst.task is not None and not inst.task.done and inst.task.gen is not None:
            inst.task.gen.close()
        inst.task = None
        self._lean_tasks.pop(inst.slot, None)
        inst.call = inst.call_outcome = inst.component_instance = None
        if inst.store is not None:
            self._reaper.drop(inst.store)  # deleted beside this thread (engine/runtime/reaper.py)
        inst.store = None
        inst.context_ptr = None
        self._by_slot.pop(inst.slot, None)
        self._on_stop(inst, ok, error)

    def _tick(self, tick_s: float) -> None:
        while not self._stopping:
            self._live.wait()
            time.sleep(tick_s)
            self.engine.increment_epoch()


def describe_trap(text: str, guest_output: bytes) -> str:
    """What the client hears of a trap: wasmtime's reason (the text after "Caused by:", without the Wasm
    backtrace, which names the guest's internals and is logged instead) and the tail of what the guest last
    wrote to stdout/stderr (a panicking guest prints its own message there before it traps)."""
    if "epoch" in text or "interrupt" in text:
        return "stopped: exceeded its time budget"
    lines = [line.strip() for line in text.splitlines()]
    if "Caused by:" in lines:
        reason = "; ".join(line for line in lines[lines.index("Caused by:") + 1:] if line)
    else:
        reason = next((line for line in lines if line and "backtrace" not in line), "a trap")
    message = f"trapped: {reason}"
    tail = guest_output.decode("utf-8", errors="replace").strip()[-MAX_GUEST_TAIL_CHARS:]
    return message + (f" (its last output: {tail})" if tail else "")

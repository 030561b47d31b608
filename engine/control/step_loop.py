"""The step loop: runs the Controller's (controller.py) steps on the executor, one at a time.

One job: when there is work, form a step (StepBuilder, scheduling.py) with the lock held, run it on the
executor WITHOUT the lock, deliver its results with the lock held again, then tell the step listeners.
`start()` does that on a thread of its own whenever there is work (everything queued when a step ends forms the
next one); tests may call `step()` instead. Pipelined (ControlConfig.pipeline), step N + 1 is submitted before
step N is delivered (docs/decisions/pipelined-steps.md).

The lock is the Controller's: it guards the ControlState and this class's wakeup and gathering fields; the
undelivered pipelined steps (`_pending`) are the step lock's, which is held across a whole step. The
Controller takes the lock through `locked()`, whose exit wakes the run thread (the call may have created work)
and settles the futures the call resolved after releasing it (their callbacks may call back in). Wakeup
invariant: every mutating call bumps `_generation`; the thread sleeps only while the last step that found
nothing to do saw the current generation, so no queued work waits for a wakeup that never comes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Protocol

from pie_server.engine.config import EngineInfo
from pie_server.engine.control.api import ControlError
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.instance import InstanceState
from pie_server.engine.control.scheduling import StepBuilder
from pie_server.engine.control.state import ControlState, awaits_delivery
from pie_server.engine.control.step_log import StepLog
from pie_server.engine.control.work import ForwardItem
from pie_server.engine.futures import settle
from pie_server.engine.step import Batch, StepResult

log = logging.getLogger(__name__)


class PendingStep(Protocol):
    step_id: int

    def result(self) -> StepResult: ...


class Executor(Protocol):
    info: EngineInfo
    num_swap_slots: int

    def execute(self, batch: Batch) -> StepResult: ...

    def submit(self, batch: Batch) -> PendingStep:
        """Only with ControlConfig.pipeline: enqueue the step, results later (engine/step.py's fed_token)."""


class StepLoop:
    def __init__(self, state: ControlState, executor: Executor, config: ControlConfig,
                 lock: threading.Lock) -> None:
        self._state, self._executor, self._config = state, executor, config
        self._lock = lock
        self._changed = threading.Condition(lock)
        self._generation = 0  # bumped by every call that may create work
        self._idle_generation = -1  # the generation at which a step found nothing to do
        self._loop_waiting = False  # the run thread sleeps on _changed
        self._step_lock = threading.Lock()  # one step at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._awaited: set[InstanceState] = set()  # resolved by the last step, next forward not yet submitted
        self._step_end = 0.0  # monotonic
        self._last_arrival: float | None = None  # of an awaited submission since the last step's end
        self._last_step_s = 0.0
        self._listeners: list[Callable[[], None]] = []
        self._pending: deque[PendingStep] = deque()  # submitted, not delivered (pipelined), oldest first
        self._step_log = StepLog.open(config.step_log) if config.step_log else None

    # -- the Controller's side (the lock held, except locked() and add_listener) ---------------------------
    def locked(self, mutating: bool = True) -> "_Locked":
        """`with loop.locked():` holds the lock; on exit, wakes the run thread (if mutating: the call may
        have created work) and settles the futures the call resolved, after releasing the lock."""
        return _Locked(self, mutating)

    def enqueue(self, instance: InstanceState, item: ForwardItem) -> None:
        """Queues a validated forward; an instance the run thread is gathering for has now arrived."""
        self._state.enqueue(instance, item)
        if instance in self._awaited:
            self._awaited.discard(instance)
            self._last_arrival = time.monotonic()

    def forget(self, instance: InstanceState) -> None:
        """The instance is closed: gathering waits for it no more."""
        self._awaited.discard(instance)

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # -- stepping -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Forms and runs one batch (pipelined: submits one and delivers the one before); False when there
        was nothing to do."""
        ran = self._step_pipelined() if self._config.pipeline else self._step()
        if ran:
            for listener in self._listeners:
                listener()
        elif self._step_log is not None:
            self._step_log.flush()  # idle: the lines so far are on disk even if the process is killed next
        return ran

    def _step(self) -> bool:
        with self._step_lock:
            forming = time.monotonic()
            with self.locked(mutating=False):
                batch = StepBuilder(self._state).form()
                if batch is None:
                    self._idle_generation = self._generation
                    return False
                resolving = [chunk.instance for chunk in self._state.inflight_chunks() if chunk.is_last]
            started = time.monotonic()
            if self._step_log is not None:
                self._step_log.submitted(batch, started, started - forming, 0.0)
            try:
                result = self._executor.execute(batch)
            except Exception as exc:  # the step's commands fail; the engine keeps going
                log.exception("executor step %d failed", batch.step_id)
                if self._step_log is not None:
                    self._step_log.forget_pending()
                with self.locked(mutating=False):
                    StepBuilder(self._state).fail_inflight(ControlError(f"the executor failed this step: {exc!r}"))
                return True
            executed = time.monotonic()
            with self.locked(mutating=False):
                StepBuilder(self._state).deliver(result)
                self._step_end, self._last_arrival = time.monotonic(), None
                self._last_step_s = self._step_end - started
                if self._step_log is not None:
                    self._step_log.delivered(batch.step_id, executed - started, self._step_end - executed)
                self._awaited = {i for i in resolving if not i.closed and i.failure is None
                                 and not i.num_queued_forwards}
            return True

    def _step_pipelined(self) -> bool:
        """Step N + 1 is formed and submitted before step N's results are delivered, so the host's work of
        both overlaps the device's (docs/decisions/pipelined-steps.md); decodes running in step N continue
        in step N + 1 with the token it samples, fed on the device. A forward of the API resolved by step N
        is gathered (see _gather) into step N + 2, formed while N + 1 runs. With speculation_depth 2, step
        N + 2 is also formed and submitted before step N is delivered, unless some running step holds a forward
        whose next one waits for that step's delivery (RunningStep.awaits_delivery)."""
        with self._step_lock:
            if self._pending and self._nothing_to_speculate():
                # The running step's forwards all go back to their callers, whose next ones come after it is
                # delivered: a step formed now would run without them, and its callers and theirs would then
                # alternate between two half batches (each token two steps). Deliver first and gather instead.
                self._deliver_oldest()
                return True
            forming = time.monotonic()
            with self.locked(mutating=False):
                batch = StepBuilder(self._state).form(speculate=True)
                if batch is None and not self._pending:
                    self._idle_generation = self._generation
                    return False
                # Two steps ahead only while no running step resolves a forward whose next one waits for it: its
                # caller's next forward would otherwise land a step later (three steps per token, not two).
                depth = self._config.speculation_depth
                if depth > 1 and any(step.awaits_delivery for step in self._state.running):
                    depth = 1
            if batch is not None:
                submitting = time.monotonic()
                try:
                    self._pending.append(self._executor.submit(batch))
                except Exception as exc:
                    self._fail_running(batch.step_id, exc)
                    return True
                if self._step_log is not None:
                    self._step_log.submitted(batch, submitting, submitting - forming, time.monotonic() - submitting)
            if batch is None:
                self._deliver_oldest()
            while len(self._pending) > depth:  # (more than once only when the depth just fell to 1)
                self._deliver_oldest()
            return True

    def _nothing_to_speculate(self) -> bool:
        """The newest running step has no decode of the control layer that goes on without its token (one that
        follows tokens needs it first: decoding.py), so nothing continues on the device."""
        with self.locked(mutating=False):
            newest = self._state.running[-1] if self._state.running else None
            return newest is not None and all(awaits_delivery(chunk) for chunk, _ in newest.sources)

    def _deliver_oldest(self) -> None:
        pending = self._pending.popleft()
        waiting = time.monotonic()
        try:
            result = pending.result()
        except Exception as exc:
            self._fail_running(pending.step_id, exc)
            return
        delivering = time.monotonic()
        with self.locked(mutating=False):
            # Forwards of the API resolved by this step: their callers answer with the next one while the
            # step after it runs, so gathering waits for them before forming the step after that (without,
            # each of their tokens takes two pipelined steps). A decode in the control layer needs nobody.
            resolving = [chunk.instance for chunk, _ in self._state.running[0].sources
                         if chunk.is_last and chunk.item.decoding is None] if self._state.running else []
            StepBuilder(self._state).deliver(result)
            now = time.monotonic()
            self._last_step_s = now - self._step_end if self._step_end else 0.0  # delivery to delivery
            self._step_end, self._last_arrival = now, None
            self._awaited = {i for i in resolving if not i.closed and i.failure is None
                             and not i.num_queued_forwards}
        if self._step_log is not None:
            self._step_log.delivered(pending.step_id, delivering - waiting, time.monotonic() - delivering)

    def _fail_running(self, step_id: int, exc: Exception) -> None:
        """A failed step fails every running step (the later ones were fed from it); the engine goes on."""
        log.error("executor step %d failed", step_id, exc_info=exc)
        for pending in self._pending:
            try:
                pending.result()
            except Exception:
                pass
        self._pending.clear()
        if self._step_log is not None:
            self._step_log.forget_pending()
        error = ControlError(f"the executor failed this step: {exc!r}")
        with self.locked(mutating=False):
            while self._state.running:
                StepBuilder(self._state).fail_inflight(error)

    # -- the run thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Runs steps on a background thread until stop()."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the controller is already running")
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="control-loop", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """The run thread is alive (start() was called and neither stop() nor a crash ended it)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._changed.notify_all()
        if thread is not None:
            thread.join()
        if self._step_log is not None:
            self._step_log.stop()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and self._generation == self._idle_generation:
                    self._loop_waiting = True
                    self._changed.wait()
                    self._loop_waiting = False
                if self._stopping:
                    break
            try:
                if self.step():
                    self._gather()
            except Exception:  # a bug in the control layer itself: log, and wait for new work
                log.exception("control loop step failed")
                with self._lock:
                    self._idle_generation = self._generation
        with self._step_lock:  # stopped: what still runs on the device is delivered, not dropped
            while self._pending:
                self._deliver_oldest()

    def _gather(self) -> None:
        """Pie's adaptive policy starts a step as soon as the last one ends. But the instances whose forwards
        that step resolved need a moment (their guest and host code) to submit the next ones; a step formed
        without them runs half a batch, and the two halves then alternate, doubling the steps per token.
        So wait for them, briefly: see ControlConfig's gather_* fields."""
        cfg = self._config
        with self._lock:
            hard_deadline = self._step_end + min(cfg.gather_max_s, cfg.gather_fraction * self._last_step_s)
            while self._awaited and not self._stopping:
                deadline = hard_deadline
                if self._last_arrival is not None:  # once they come, a pause in arrivals ends the wait
                    deadline = min(deadline, self._last_arrival + cfg.gather_idle_s)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._loop_waiting = True
                self._changed.wait(remaining)
                self._loop_waiting = False
            self._awaited = set()


class _Locked:
    """StepLoop.locked()'s context: part of the loop (it reads and bumps the loop's wakeup fields)."""
    __slots__ = ("loop", "mutating", "outbox")

    def __init__(self, loop: StepLoop, mutating: bool) -> None:
        self.loop, self.mutating = loop, mutating

    def __enter__(self) -> None:
        self.loop._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        loop = self.loop
        try:
            if self.mutating:
                loop._generation += 1
                if loop._loop_waiting:
                    loop._changed.notify()
            outbox = loop._state.take_outbox()
        finally:
            loop._lock.release()
        for future, value, error in outbox:
            settle(future, value, error)  # False: the caller cancelled it

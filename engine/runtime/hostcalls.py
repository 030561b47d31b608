"""Host calls that wait: the task objects a suspended call lives in (scheduler thread only).

Two shapes (see hostfn): a generator HostTask that yields Futures, advanced by `advance`; and the lean
wait of hot calls: one Future whose result the function's `finish` turns into the value. Either way, once
the value is known it is encoded into wasmtime's results array at once and the instance's DoneFlag is set:
wasmtime's continuation reads the flag in C, so polls of a suspended call run no Python.

A lean wait reuses one LeanTask per instance (no per-call objects besides the Future); its impl runs
after the poll that suspended the call (`run`), on the scheduler's stack.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pie_server.engine.control.api import ControlError
from pie_server.engine.runtime.ffi_async import DoneFlag
from pie_server.engine.runtime.hostfn import GuestError, HostFunction
from pie_server.engine.runtime.instance import HostTask

log = logging.getLogger(__name__)
GUEST_FAULTS = (GuestError, ControlError, ValueError)  # become the err value of a result<_, string> call


@dataclass
class Task(HostTask):
    """A generator HostTask, its compiled result encoder and the instance's DoneFlag."""

    encode: Callable[[Any, int], None] | None = None
    flag: DoneFlag | None = None


@dataclass
class LeanTask(HostTask):
    """One instance's lean waits (gen stays None), made once per instance with its DoneFlag and the
    Future's done-callback. Per call: the host function, its decoded arguments (until the impl ran), the
    encoder and the Future waited on."""

    encode: Callable[[Any, int], None] | None = None
    flag: DoneFlag | None = None
    on_done: Callable[[Future], None] | None = None
    fn: HostFunction | None = None
    arguments: Sequence[Any] = ()
    future: Future | None = None


def lean_task(on_done: Callable[[Future], None]) -> LeanTask:
    return LeanTask(None, "", None, None, flag=DoneFlag(), on_done=on_done)  # type: ignore[arg-type]


def run(task: LeanTask, inst: Any) -> bool:
    """After the poll that suspended a lean call: run the impl. False while it waits on the Future it
    returned (the Future's done-callback is set); True when the call ended at once (see `complete`)."""
    arguments, task.arguments = task.arguments, ()
    try:
        outcome = task.fn.impl(inst, *arguments)  # type: ignore[union-attr]
    except BaseException as failure:
        complete(task, failure=failure)
        return True
    if isinstance(outcome, Future):
        task.future = outcome
        outcome.add_done_callback(task.on_done)  # type: ignore[arg-type]  # (at once if already done)
        return False
    complete(task, value=outcome)
    return True


def complete(task: LeanTask, value: Any = None, failure: BaseException | None = None) -> None:
    """The general ending of a lean call: encode `value`, or `failure` as the err value when the function
    returns result<_, string> and the failure is the guest's; anything else is an internal error
    (task.internal_error: the scheduler stops the instance). task.done is set either way."""
    fn = task.fn
    assert fn is not None
    task.name, task.schema = fn.name, fn.schema
    try:
        if failure is not None:
            if not (isinstance(failure, GUEST_FAULTS) and fn.returns_result):
                raise failure
            value = ("err", str(failure))
        if task.results_ptr is not None and task.encode is not None:
            task.encode(value, task.results_ptr)
    except BaseException as error:
        if not isinstance(error, GUEST_FAULTS):
            log.exception("host call %s failed", fn.name)
        task.internal_error = f"host error in {fn.interface}.{fn.name}: {error!r}"
    else:
        task.flag.byte[0] = 1  # type: ignore[union-attr]
    task.done = True


def finish_generator(task: Task) -> str | None:
    """A generator task returned: encode its value and set the flag. The internal error, if any."""
    if task.internal_error is None:
        try:
            if task.results_ptr is not None and task.encode is not None:
                task.encode(task.value, task.results_ptr)
            task.flag.byte[0] = 1  # type: ignore[union-attr]
        except BaseException as error:
            log.exception("encoding the result of %s failed", task.name)
            task.internal_error = f"host error encoding the result of {task.name}: {error!r}"
    return task.internal_error


def advance(task: HostTask, value: Any, error: BaseException | None, wake: Callable[[Any], None],
            lock: Any) -> None:
    """Run a generator task until it waits on pending Futures (wake(what it yielded) is then called, from
    any thread, once all of them are done) or returns (task.done). `lock` guards the countdown."""
    while True:
        try:
            waited = task.gen.throw(error) if error is not None else task.gen.send(value)
        except StopIteration as stop:
            task.done, task.value = True, stop.value
            return
        except GUEST_FAULTS as failure:
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
            value, error = outcome(waited)
            continue
        remaining = [len(pending)]

        def on_done(_: Future, waited: Any = waited) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            wake(waited)
        for future in pending:
            future.add_done_callback(on_done)
        return


def outcome(waited: Any) -> tuple[Any, BaseException | None]:
    """What a generator receives for what it yielded: a value or an exception to throw (for a list: the
    list of results, exceptions in place of failed ones)."""
    if isinstance(waited, list):
        return [f.exception() or f.result() for f in waited], None
    error = waited.exception()
    return (None, error) if error is not None else (waited.result(), None)

"""Profiles the inferlet scheduler thread of every `pie serve` started with this folder on PYTHONPATH and
PIE_PROF=PREFIX set (a measuring aid, not part of the server; it patches private methods of
engine/runtime/scheduler.py and breaks when they change).

    PIE_PROF=/tmp/prof PYTHONPATH=$PWD/scripts/profile_scheduler .venv/bin/python -m bench.agentic \\
        --model /tmp/tiny-llama --concurrency 32 --tasks-per-agent 2
    python3 scripts/profile_scheduler/report.py /tmp/prof 66

Per process it appends a JSON line of cumulative counters to PREFIX.<pid> every 0.5 s: each host callback by
name (count, wall s), the polls (`step_total` wall s, `step_cpu` the thread's CPU s, `step_faults` its minor
page faults, `step_callbacks` wall s of callbacks inside polls), lean impls run after polls, `add` (instance
starts) and `wait` (idle). Guest time ~ step_total - step_callbacks - lean runs; `guest>NAME` splits it by
the host call that ends each stretch (`guest>(poll end)`: from the last callback to the poll's return).
"""
import os

if os.environ.get("PIE_PROF"):
    import collections
    import json
    import resource
    import threading
    import time
    import types

    import pie_server.engine.runtime.scheduler as scheduler
    from pie_server.engine.runtime import hostcalls

    stats = collections.defaultdict(lambda: [0, 0.0])
    # last: when the guest last got control back in this poll (poll start or a callback's return); the guest's
    # time up to the next callback is counted under "guest>NAME" (the segment that ends calling NAME)
    state = {"callbacks_s": 0.0, "name": "?", "last": 0.0}

    def _count(key, seconds, n=1):
        entry = stats[key]
        entry[0] += n
        entry[1] += seconds

    real_callback_type = scheduler.ffi_async.RAW_ASYNC_FUNC_T

    def _timed_callback_type(callback):
        name = state["name"]

        def timed(*args):
            started = time.perf_counter()
            _count("guest>" + name, started - state["last"])
            try:
                return callback(*args)
            finally:
                state["last"] = ended = time.perf_counter()
                elapsed = ended - started
                state["callbacks_s"] += elapsed
                _count("cb:" + name, elapsed)
        return real_callback_type(timed)

    # the scheduler module sees copies of ffi_async and hostcalls with two functions replaced
    ffi_copy = types.SimpleNamespace(**{k: getattr(scheduler.ffi_async, k) for k in dir(scheduler.ffi_async)
                                        if not k.startswith("__")})
    ffi_copy.RAW_ASYNC_FUNC_T = _timed_callback_type
    scheduler.ffi_async = ffi_copy
    real_run = hostcalls.run

    def _run(task, inst):
        started = time.perf_counter()
        try:
            return real_run(task, inst)
        finally:
            _count("lean_run:" + getattr(task.fn, "name", "?"), time.perf_counter() - started)

    hostcalls_copy = types.SimpleNamespace(**{k: getattr(hostcalls, k) for k in dir(hostcalls)
                                              if not k.startswith("__")})
    hostcalls_copy.run = _run
    scheduler.hostcalls = hostcalls_copy
    Scheduler = scheduler.Scheduler
    real_make_callback, real_step, real_wait = Scheduler.make_callback, Scheduler._step, Scheduler._wait
    real_add, real_finish = Scheduler.add, Scheduler._finish_call

    def make_callback(self, fn):
        state["name"] = f"{fn.interface.split('/')[-1]}.{fn.name}" + (":lean" if fn.finish is not None else "")
        return real_make_callback(self, fn)

    def _step(self, inst):
        callbacks_before = state["callbacks_s"]
        usage_before = resource.getrusage(resource.RUSAGE_THREAD)
        state["last"] = started = time.perf_counter()
        phase = inst.phase  # before the poll: "instantiating" or "running"
        real_step(self, inst)
        # the poll's last stretch, by the instance's phase and whether a callback ran in the poll (one without
        # is all guest, e.g. instantiation; the scheduler's own work after the poll, lean impls and the teardown
        # of a finished instance included)
        tail = time.perf_counter() - state["last"]
        _count("guest>(poll end)", tail)
        _count(f"guest>(poll end):{phase}:{'cb' if state['callbacks_s'] > callbacks_before else 'no cb'}", tail)
        elapsed = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        _count("step_total", elapsed)
        _count("step_callbacks", state["callbacks_s"] - callbacks_before)
        _count("step_cpu", usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime)
        _count("step_faults", 0.0, usage.ru_minflt - usage_before.ru_minflt)

    def _timed(real, key):
        def wrapper(self, *args):
            started = time.perf_counter()
            real(self, *args)
            _count(key, time.perf_counter() - started)
        return wrapper

    Scheduler.make_callback, Scheduler._step = make_callback, _step
    Scheduler._wait, Scheduler.add = _timed(real_wait, "wait"), _timed(real_add, "add")
    Scheduler._finish_call = _timed(real_finish, "finish_call")
    started_at = time.perf_counter()

    def _dump() -> None:
        path = f"{os.environ['PIE_PROF']}.{os.getpid()}"
        while True:
            time.sleep(0.5)
            row = {key: [n, round(s, 6)] for key, (n, s) in sorted(stats.items())}
            row["wall"] = time.perf_counter() - started_at
            with open(path, "a") as out:
                out.write(json.dumps(row) + "\n")

    threading.Thread(target=_dump, name="profile-dump", daemon=True).start()

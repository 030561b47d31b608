"""An optional log of the steps the control loop runs: what each step held and when it was submitted and
delivered, one JSON line per step (`PIE_STEP_LOG=PATH pie serve ...`; scripts/step_log_summary.py reads it).

What it is for: the engine core's steps under a real load, e.g. how many steps with prefill tokens interrupt the
running decodes when requests arrive, and how long those steps take next to decode-only ones. Pipelined, a
step's delivery-to-delivery interval is its time on the device whenever the device is the bound.

Line fields: step (the Batch's step_id), submitted and delivered (time.monotonic() seconds), forwards,
tokens, prefill_forwards and prefill_tokens (forwards with more than one token: prompts, chunks, written
text), and the control loop's own time for the step in ms: form_ms (StepBuilder.form: gathering, grammar masks,
the batch), submit_ms (the executor's submit: inputs, launches; 0 unpipelined), wait_ms (blocked on the result:
the device, or the whole execute unpipelined) and deliver_ms (StepBuilder.deliver: tokens to their decodes and
callers); and since the loop last logged a submission (one pipelined cycle), cpu_ms, the loop thread's CPU time
(time.thread_time(): the rest of the cycle it was off the CPU: blocked on the device, or waiting for the GIL or
a lock, or descheduled; a CUDA event's synchronize spins, so waiting for a GPU counts as CPU time), and gc_ms, the process's garbage collections (any thread's). Lines are buffered and
written every FLUSH_LINES steps, whenever the loop goes idle and when it stops.
"""
from __future__ import annotations

import gc
import json
import time
from typing import TextIO

from pie_server.engine.step import Batch

FLUSH_LINES = 256


class StepLog:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        # step id -> (submitted at, forwards, tokens, prefill forwards, prefill tokens, form s, submit s, cpu s, gc s)
        self._submitted: dict[int, tuple[float, int, int, int, int, float, float, float, float]] = {}
        self._lines: list[str] = []  # all touched on the control loop's thread (stop() joins it first)
        self._cpu_s: float | None = None  # the loop thread's CPU time at the last submission logged
        self._gc = _GcTime()
        gc.callbacks.append(self._gc)

    @classmethod
    def open(cls, path: str) -> "StepLog":
        return cls(open(path, "a", encoding="utf-8"))

    def submitted(self, batch: Batch, at: float, form_s: float, submit_s: float) -> None:
        """batch was submitted at `at` (time.monotonic()), formed in form_s and submitted in submit_s. Called on
        the loop's thread (its CPU time is read here)."""
        cpu_s, self._cpu_s = self._cpu_s, time.thread_time()
        gc_s, self._gc.total_s = self._gc.total_s, 0.0
        if cpu_s is None:  # the first step: no cycle before it
            cpu_s, gc_s = self._cpu_s, 0.0
        num_tokens = num_prefill_forwards = num_prefill_tokens = 0
        for command in batch.forwards:
            n = len(command.token_ids)
            num_tokens += n
            if n > 1:
                num_prefill_forwards += 1
                num_prefill_tokens += n
        self._submitted[batch.step_id] = (at, len(batch.forwards), num_tokens, num_prefill_forwards,
                                          num_prefill_tokens, form_s, submit_s, self._cpu_s - cpu_s, gc_s)

    def delivered(self, step_id: int, wait_s: float, deliver_s: float) -> None:
        """step_id's results reached their callers, after wait_s blocked on them and deliver_s handing them out
        (a step never submitted to this log is ignored)."""
        entry = self._submitted.pop(step_id, None)
        if entry is None:
            return
        submitted, forwards, tokens, prefill_forwards, prefill_tokens, form_s, submit_s, cpu_s, gc_s = entry
        self._lines.append(json.dumps({
            "step": step_id, "submitted": round(submitted, 6), "delivered": round(time.monotonic(), 6),
            "forwards": forwards, "tokens": tokens, "prefill_forwards": prefill_forwards,
            "prefill_tokens": prefill_tokens, "form_ms": round(form_s * 1e3, 3),
            "submit_ms": round(submit_s * 1e3, 3), "wait_ms": round(wait_s * 1e3, 3),
            "deliver_ms": round(deliver_s * 1e3, 3), "cpu_ms": round(cpu_s * 1e3, 3), "gc_ms": round(gc_s * 1e3, 3)}))
        if len(self._lines) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._out.write("\n".join(self._lines) + "\n")
            self._out.flush()
            self._lines = []

    def forget_pending(self) -> None:
        """The submitted steps will not be delivered (they failed)."""
        self._submitted.clear()

    def stop(self) -> None:
        """Flushes and stops timing collections (steps logged later still get their lines, gc_ms 0)."""
        self.flush()
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)


class _GcTime:
    """A gc callback summing the time of the process's collections (total_s, reset by the log)."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._started

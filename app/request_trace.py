"""Where a request's time to first token goes, one JSON line per request (PIE_REQUEST_TRACE=PATH; each front-end
process appends to PATH.<pid>). Off by default; for benchmarks (docs/benchmarks.md).

A line: {"in_flight": n, "arrival_s": s, "slot": ms, "launched": ms, "prompt": ms, "admitted": ms, "submitted": ms,
"received": ms, "first_token": ms}: the HTTP requests this front end was answering when the request's run began
(the load it met), when it arrived (time.monotonic(), the same clock in every process of the machine), then each
phase's time since it arrived at the route: a run slot taken (AppState.run), the instance launched, its "prompt"
event read (the inferlet's start: instantiation, template, tokenization), its KV pages reserved (admission), its
generation sent to the engine core (the "go" message read and the inferlet's own work until `generate`), the
first sampled token back in the front end (the engine core: queueing, prefill, the step), its first text delta
read by the HTTP side (the front end's scheduler thread, detokenization, the outbox). "submitted" and
"received" come from the runtime's generate path when it decodes in the control layer, the default
(engine/runtime/api_generate.py); an inferlet that never calls `generate` has neither."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import TextIO

ENV_VAR = "PIE_REQUEST_TRACE"
PHASES = ("slot", "launched", "prompt", "admitted", "submitted", "received", "first_token")
ENGINE_PHASES = ("submitted", "received")  # marked by the runtime, absent for inferlets without `generate`


class RequestTrace:
    """A request's phase marks (time.monotonic()), set as it passes them."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.in_flight = 0

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, time.monotonic())


class TraceWriter:
    def __init__(self, path: str) -> None:
        self._file: TextIO = open(f"{path}.{os.getpid()}", "a", buffering=1)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "TraceWriter | None":
        path = os.environ.get(ENV_VAR)
        return cls(path) if path else None

    def write(self, trace: RequestTrace, arrival: float) -> None:
        phases = {p: round((trace.marks[p] - arrival) * 1e3, 3) for p in PHASES if p in trace.marks}
        line = json.dumps({"in_flight": trace.in_flight, "arrival_s": round(arrival, 4), **phases})
        with self._lock:
            self._file.write(line + "\n")

"""An optional log of the steps the control loop runs: what each step held and when it was submitted and
delivered, one JSON line per step (`PIE_STEP_LOG=PATH pie serve ...`; scripts/step_log_summary.py reads it).

What it is for: the engine core's steps under a real load, e.g. how many steps with prefill tokens interrupt the
running decodes when requests arrive, and how long those steps take next to decode-only ones. Pipelined, a
step's delivery-to-delivery interval is its time on the device whenever the device is the bound.

Line fields: step (the Batch's step_id), submitted and delivered (time.monotonic() seconds), forwards,
tokens, prefill_forwards and prefill_tokens (forwards with more than one token: prompts, chunks, written
text). Lines are buffered and written every FLUSH_LINES steps and when the control loop stops.
"""
from __future__ import annotations

import json
import time
from typing import TextIO

from pie_server.engine.step import Batch

FLUSH_LINES = 256


class StepLog:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._submitted: dict[int, tuple[float, int, int, int, int]] = {}  # step id -> (time, counts...)
        self._lines: list[str] = []  # all touched on the control loop's thread (stop() joins it first)

    @classmethod
    def open(cls, path: str) -> "StepLog":
        return cls(open(path, "a", encoding="utf-8"))

    def submitted(self, batch: Batch) -> None:
        num_tokens = num_prefill_forwards = num_prefill_tokens = 0
        for command in batch.forwards:
            n = len(command.token_ids)
            num_tokens += n
            if n > 1:
                num_prefill_forwards += 1
                num_prefill_tokens += n
        self._submitted[batch.step_id] = (time.monotonic(), len(batch.forwards), num_tokens,
                                          num_prefill_forwards, num_prefill_tokens)

    def delivered(self, step_id: int) -> None:
        """step_id's results reached their callers (a step never submitted to this log is ignored)."""
        entry = self._submitted.pop(step_id, None)
        if entry is None:
            return
        submitted, forwards, tokens, prefill_forwards, prefill_tokens = entry
        self._lines.append(json.dumps({
            "step": step_id, "submitted": round(submitted, 6), "delivered": round(time.monotonic(), 6),
            "forwards": forwards, "tokens": tokens, "prefill_forwards": prefill_forwards,
            "prefill_tokens": prefill_tokens}))
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

"""Summary of a step log (`PIE_STEP_LOG=PATH pie serve ...`, engine/control/step_log.py): the engine core's
steps by their number of rows (a load level's steps have up to its concurrency) and by whether they hold
prefill tokens, with their count, rows, tokens and time.

    python3 scripts/step_log_summary.py PATH

A step's time is from the later of its submission and the previous step's delivery to its own delivery: with
pipelined steps on a busy device, the device's time for that step (idle stretches between steps are not
counted in it).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def step_times(steps: list[dict]) -> list[float]:
    """ms per step, in delivery order."""
    times, previous = [], None
    for step in steps:
        start = step["submitted"] if previous is None else max(step["submitted"], previous)
        times.append((step["delivered"] - start) * 1e3)
        previous = step["delivered"]
    return times


ROW_BANDS = ((1, 1), (2, 16), (17, 64), (65, 256), (257, 1 << 30))  # rows per step: a load level's steps


def summary(steps: list[dict]) -> str:
    steps = sorted(steps, key=lambda s: s["delivered"])
    times = step_times(steps)
    rows = ["rows      kind            steps   rows (median)   tokens (median)   ms median   ms p90   ms total"]
    for low, high in ROW_BANDS:
        for kind, with_prefill in (("decode only", False), ("with prefill", True)):
            chosen = [(s, t) for s, t in zip(steps, times)
                      if low <= s["forwards"] <= high and (s["prefill_forwards"] > 0) == with_prefill]
            if not chosen:
                continue
            ms = sorted(t for _, t in chosen)
            band = f"{low}-{high}" if high < 1 << 30 else f"{low}-"
            rows.append(f"{band:<9} {kind:<13} {len(chosen):>7}   "
                        f"{statistics.median(s['forwards'] for s, _ in chosen):>13}   "
                        f"{statistics.median(s['tokens'] for s, _ in chosen):>15}   {statistics.median(ms):>9.2f}   "
                        f"{ms[min(len(ms) - 1, int(0.9 * len(ms)))]:>6.2f}   {sum(ms):>8.0f}")
    span = steps[-1]["delivered"] - steps[0]["submitted"] if steps else 0.0
    rows.append(f"{len(steps)} steps over {span:.1f} s")
    return "\n".join(rows)


def main() -> None:
    steps = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    print(summary(steps))


if __name__ == "__main__":
    main()

"""Summary of a step log (`PIE_STEP_LOG=PATH pie serve ...`, engine/control/step_log.py): the engine core's
steps by their number of rows (a load level's steps have up to its concurrency) and by whether they hold
prefill tokens, with their count, rows, tokens and time.

    python3 scripts/step_log_summary.py PATH [--between START END | --windows AGENTIC_JSON] [--cycles]

A step's time is from the later of its submission and the previous step's delivery to its own delivery: with
pipelined steps on a busy device, the device's time for that step (idle stretches between steps are not
counted in it). The last columns split the control loop's own time per step (engine/control/step_log.py):
forming it, submitting it, blocked on its result, delivering it.

--cycles adds, for pipelined decode-only steps of 17 or more rows, the loop's cycle (one submission to the next)
split into those parts and the rest (listeners, gathering, waits for the GIL or the control layer's lock between
parts), at the median, p90 and over the slowest tenth of cycles: where the slow steps' time goes. Logs with the
loop thread's CPU time (cpu_ms, gc_ms) add, per cycle: that CPU time, the time it was off the CPU other than
blocked on the device (total - cpu - wait: GIL or lock waits, descheduled) and the garbage collections' time. That
middle column assumes the wait blocks (the emulated device sleeps); on CUDA the executor's wait is an event's
synchronize, which spins on the CPU, so there it reads low by up to the wait (at the median it can be negative).
"""
from __future__ import annotations

import argparse
import json
import statistics
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
    rows = ["rows      kind            steps   rows (median)   tokens (median)   ms median   ms p90   ms total"
            "   form / submit / wait / deliver ms (median)"]
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
                        f"{p90(ms):>6.2f}   {sum(ms):>8.0f}   "
                        + _host_parts([s for s, _ in chosen]))
    span = steps[-1]["delivered"] - steps[0]["submitted"] if steps else 0.0
    rows.append(f"{len(steps)} steps over {span:.1f} s")
    return "\n".join(rows)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _host_parts(steps: list[dict]) -> str:
    """The control loop's own time per step, median of each part (logs before these fields: -)."""
    parts = ("form_ms", "submit_ms", "wait_ms", "deliver_ms")
    if not all(p in s for s in steps for p in parts):
        return "-"
    return " / ".join(f"{statistics.median(s[p] for s in steps):.2f}" for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--between", type=float, nargs=2, metavar=("START", "END"), default=None,
                        help="only the steps submitted in this span of time.monotonic() seconds")
    parser.add_argument("--windows", default=None, metavar="AGENTIC_JSON",
                        help="one summary per level and mode of this bench.agentic result (their window_s)")
    parser.add_argument("--cycles", action="store_true", help="the pipelined loop's cycles, split (see above)")
    args = parser.parse_args()
    steps = [json.loads(line) for line in Path(args.path).read_text().splitlines() if line.strip()]
    if args.windows is not None:
        for level in json.loads(Path(args.windows).read_text())["levels"]:
            for mode, result in level.items():
                if isinstance(result, dict) and "window_s" in result:
                    print(f"== concurrency {level['concurrency']}, {mode}: {result['tasks_per_s']:.2f} tasks/s")
                    print(window_summary(steps, *result["window_s"]))
    elif args.between is not None:
        print(window_summary(steps, *args.between))
    else:
        print(summary(steps))
    if args.cycles:
        print(cycle_summary(steps))


def window_summary(steps: list[dict], start: float, end: float) -> str:
    """The steps submitted between start and end (time.monotonic() seconds), and the share of that span in
    which a step ran."""
    chosen = sorted((s for s in steps if start <= s["submitted"] <= end), key=lambda s: s["delivered"])
    busy_s = sum(step_times(chosen)) / 1e3
    return (f"{len(chosen)} steps in {end - start:.1f} s, a step running {100 * busy_s / (end - start):.0f} % of it\n"
            + summary(chosen))


CYCLE_PARTS = ("form", "submit", "wait", "deliver", "rest")


def cycles(steps: list[dict], min_rows: int = 17) -> list[dict[str, float]]:
    """ms per part of each cycle of the pipelined loop between two decode-only steps of min_rows or more: from
    step i's submission to step i + 1's, the loop submits i (submit), takes step i - 1's result (wait, deliver),
    runs its listeners and gathers (rest), then forms i + 1 (form)."""
    steps = sorted(steps, key=lambda s: s["submitted"])
    found = []
    for before, step, after in zip(steps, steps[1:], steps[2:]):
        if any(s["forwards"] < min_rows or s["prefill_forwards"] for s in (before, step, after)):
            continue
        total = (after["submitted"] - step["submitted"]) * 1e3
        parts = {"form": after["form_ms"], "submit": step["submit_ms"], "wait": before["wait_ms"],
                 "deliver": before["deliver_ms"]}
        cycle = {**parts, "rest": total - sum(parts.values()), "total": total}
        if "cpu_ms" in after:  # the loop thread's CPU time from step's submission (logged) to after's
            cycle.update(cpu=after["cpu_ms"], off_cpu=total - after["cpu_ms"] - parts["wait"], gc=after["gc_ms"])
        found.append(cycle)
    return found


def cycle_summary(steps: list[dict], min_rows: int = 17) -> str:
    found = cycles(steps, min_rows)
    if not found:
        return f"no pipelined cycles of decode-only steps with {min_rows} or more rows"
    ordered = sorted(found, key=lambda c: c["total"])
    slowest = ordered[-max(1, len(ordered) // 10):]
    header = f"cycles of decode-only steps ({min_rows}+ rows), ms: " + " / ".join(CYCLE_PARTS) + " = total"

    timed = all("cpu" in c for c in found)
    if timed:
        header += "   | loop CPU / off CPU (not the wait) / gc"

    def line(name: str, values: list[dict[str, float]], pick) -> str:  # noqa: ANN001
        text = f"{name:<22} " + " / ".join(f"{pick([c[p] for c in values]):.2f}" for p in CYCLE_PARTS) \
            + f" = {pick([c['total'] for c in values]):.2f}"
        if timed:
            text += "   | " + " / ".join(f"{pick([c[p] for c in values]):.2f}" for p in ("cpu", "off_cpu", "gc"))
        return text

    return "\n".join([header, line(f"median ({len(found)})", found, statistics.median),
                      line("p90 (each part)", found, p90),
                      line(f"slowest tenth, mean ({len(slowest)})", slowest, statistics.fmean)])


if __name__ == "__main__":
    main()

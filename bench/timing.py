"""Wall-clock medians for the benchmarks (never for tests)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median wall time of `repeats` calls of run, in ms, after `warmup` untimed calls."""
    return statistics.median(_times(run, repeats, warmup)[0]) * 1e3


def median_rate(run: Callable[[], int], repeats: int, warmup: int = 1) -> float:
    """The median of run's returned count per second (e.g. tokens/s) over `repeats` calls."""
    seconds, counts = _times(run, repeats, warmup)
    return statistics.median(count / s for count, s in zip(counts, seconds))


def _times(run: Callable[[], object], repeats: int, warmup: int) -> tuple[list[float], list]:
    for _ in range(warmup):
        run()
    seconds, results = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        results.append(run())
        seconds.append(time.perf_counter() - started)
    return seconds, results

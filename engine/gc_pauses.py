"""The garbage collector in the server's processes: the start-up heap frozen, long collections logged.

A full (generation-2) collection walks every tracked object that is not frozen, and holds the GIL while it does:
in the engine core it stops the step loop and so the GPU (bench.gpu_throughput's 8B offline run on an H100,
2026-12-07: four collections of 80-107 ms with the start-up heap unfrozen, at most 32 ms with it frozen); in a
front end it stops the streaming and the inferlets. Start-up leaves a large long-lived heap (torch, transformers,
tokenizers, wasmtime, the web stack), so each process freezes it once it is ready (`freeze_heap`): collections
then walk only what the serving itself keeps. A front end did not until 2026-12-07: on the 2-core CPU machine
(`PIE_EMULATED_DEVICE_MS=1 pie serve --api-processes 1`, tiny model, c=32, 640 requests of 256 tokens, two runs
each way) its full collections took 183-191 ms each (3 a run, ~500 ms in all); frozen, 19 ms at most (6 a run,
~67 ms in all), throughput the same within the runs' spread.

`PIE_GC_WARN_MS=N` logs a warning for every collection longer than N milliseconds (generation, duration, objects
collected); unset or empty, nothing is watched.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from typing import Iterator

log = logging.getLogger(__name__)
ENV_VAR = "PIE_GC_WARN_MS"


def freeze_heap() -> None:
    """Collects, then moves every object alive now to the permanent generation (never walked again); and
    starts the watch of PIE_GC_WARN_MS if it is set."""
    gc.collect()
    gc.freeze()
    threshold_ms = warn_threshold_ms()
    if threshold_ms is not None:
        watch(threshold_ms)


def warn_threshold_ms() -> float | None:
    raw = os.environ.get(ENV_VAR, "")
    if raw == "":
        return None
    try:
        threshold_ms = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r}: not a number of milliseconds") from None
    if threshold_ms < 0:
        raise ValueError(f"{ENV_VAR}={raw!r}: must be >= 0")
    return threshold_ms


class _Timer:
    """A gc callback that times each collection and hands it to paused()."""

    def __init__(self) -> None:
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.paused(info.get("generation", -1), time.perf_counter() - self._started, info.get("collected", 0))

    def paused(self, generation: int, seconds: float, num_collected: int) -> None:
        raise NotImplementedError


class _Watch(_Timer):
    """Logs the collections longer than the threshold."""

    def __init__(self, threshold_ms: float) -> None:
        super().__init__()
        self.threshold_ms = threshold_ms

    def paused(self, generation: int, seconds: float, num_collected: int) -> None:
        if 1e3 * seconds > self.threshold_ms:
            log.warning("garbage collection of generation %d took %.1f ms (%d objects collected, process %d)",
                        generation, 1e3 * seconds, num_collected, os.getpid())


class _Recorder(_Timer):
    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[tuple[int, float]] = []

    def paused(self, generation: int, seconds: float, num_collected: int) -> None:
        self.pauses.append((generation, seconds))


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[int, float]]]:
    """(generation, seconds) of every collection while the block runs (benchmarks)."""
    recorder = _Recorder()
    gc.callbacks.append(recorder)
    try:
        yield recorder.pauses
    finally:
        gc.callbacks.remove(recorder)


def watch(threshold_ms: float) -> None:
    """Logs every collection longer than threshold_ms from now on (once per process: a second call changes the
    threshold)."""
    for callback in gc.callbacks:
        if isinstance(callback, _Watch):
            callback.threshold_ms = threshold_ms
            return
    gc.callbacks.append(_Watch(threshold_ms))

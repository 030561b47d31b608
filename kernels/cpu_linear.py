"""float32 matmuls on CPU, x [M, K] @ weight [N, K].T, by the way that is fastest on this machine for M rows.

Every decode step streams all the weights from memory, and at few rows the three ways torch offers differ by up
to 2.6x, in an order that depends on the CPU and the BLAS build:
- "transposed": weight @ x.T (MKL's GEMM the other way round; one row goes as two);
- "mkl": F.linear (MKL's x @ weight.T; at one row a GEMV);
- "onednn": oneDNN's linear (torch.ops.mkldnn._linear_pointwise, what torch.compile's CPU backend calls).
On the 2-core CPU machine of 2026-12-05, SmolLM2's layers and LM head at 1 / 2 / 4 rows took 43.5 / 78.0 / 62.1 ms
as "mkl" and 19.4 / 18.3 / 26.0 ms as "transposed"; on that machine's successor of 2026-12-07 (another Xeon, same
torch) 24.4 / 26.5 / 43.6 ms as "mkl" and 62.7 / 60.0 / 57.5 ms as "transposed" (`python -m bench.cpu_matmul`).
So the way per row count is measured over the model's own weights (CpuLinear.measured) and a way replaces the
default only when it is clearly faster (MIN_GAIN). The choice is remembered per machine in a small JSON file under
the cache root (keyed by the CPU's identity, the thread count, torch's build and the weight shapes), so every later
process on the machine takes the same ways without timing them (different ways round differently in the last
bits: two processes must not disagree over a close call), and the threshold can sit under the close calls seen
(1.3-1.46x at 4 rows on the machine of 2026-12-07). Without a writable cache each process measures again.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

WAYS = ("transposed", "mkl", "onednn")
ROUTE_ROWS = (1, 2, 4)  # a way for each row count up to these (3 rows go as 4's); beyond: oneDNN (measured on
# both machines: 1.15-1.5x F.linear from 8 rows on, far ahead of "transposed")
DEFAULT_WAYS = ("transposed", "transposed", "transposed")
# A measured way replaces the default only if the default takes this many times as long (close calls seen:
# 1.3-1.46x, clear ones 2.2-4.3x). The ways take turns in each round, so a slow moment of a noisy machine hits them
# alike; a wrong pick between near-equal ways costs little, and the record makes it the same in every process.
MIN_GAIN = 1.2
NUM_ROUNDS = 3  # timed passes per way and row count, the ways interleaved (after one warm-up pass each)
MAX_RECORDS = 32  # entries kept in the machine's file (the newest)
RECORD_NAME = "cpu_linear.json"  # the machine's file, under the cache root (engine/model/loader.py's cache_root)
MIN_MEASURED_BYTES = 256 << 20  # smaller models (tests' tiny ones) keep the default ways: no noisy choice
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


@dataclass(frozen=True)
class CpuLinear:
    """F.linear(x, weight, bias) for float32 x [M, K] on CPU, by ways[i] for M up to ROUTE_ROWS[i] rows and by
    oneDNN beyond; other dtypes, devices and shapes go to F.linear. Outputs are contiguous (the tensor-parallel
    all-reduce needs it) and may be written into by the caller."""

    ways: tuple[str, ...] = DEFAULT_WAYS

    def __post_init__(self) -> None:
        if len(self.ways) != len(ROUTE_ROWS) or any(way not in WAYS for way in self.ways):
            raise ValueError(f"ways: one of {WAYS} for each of {ROUTE_ROWS} rows, got {self.ways}")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        num_rows = x.shape[0]
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or num_rows == 0:
            return F.linear(x, weight, bias)
        way = self.way(num_rows)
        if way == "transposed":
            # x.T must be a transposed view of a row-major x: for a row-major x.T MKL takes the slow path again.
            rows = x.contiguous() if num_rows > 1 else x.repeat(2, 1)
            out = torch.mm(weight, rows.t()).t()[:num_rows].contiguous()
            return out if bias is None else out.add_(bias)
        if way == "onednn" and _ONEDNN_LINEAR is not None:
            return _ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def way(self, num_rows: int) -> str:
        for max_rows, way in zip(ROUTE_ROWS, self.ways):
            if num_rows <= max_rows:
                return way
        return "onednn"

    @classmethod
    def measured(cls, weights: Sequence[torch.Tensor], record: Path | None = None) -> "CpuLinear":
        """The ways for this machine: per row count, each way times passes over all of weights (float32 [N, K]
        on CPU, as a decode step streams them). record: the machine's JSON file of earlier choices (read first,
        the new choice added); None: measured in this process only. Remembered per process for the same weight
        shapes and thread count; weights under MIN_MEASURED_BYTES get the default ways."""
        if sum(w.numel() * w.element_size() for w in weights) < MIN_MEASURED_BYTES:
            return cls()  # cache-resident: timings would say nothing about a step that streams its weights
        key = _record_key(weights)
        if key not in _MEASURED:  # timing depends on the shapes, not the values: no tensor is kept
            _MEASURED[key] = _recorded(record, key) or _measure_and_record(weights, record, key)
        return _MEASURED[key]


_MEASURED: dict[str, CpuLinear] = {}  # per process: the machine does not change under it


def _record_key(weights: Sequence[torch.Tensor]) -> str:
    """What a choice depends on: the CPU (model, stepping, flags, cache), the threads, torch's build (BLAS and
    oneDNN versions) and the weight shapes."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        cpuinfo = ""
    cpu = [line for line in cpuinfo.splitlines()
           if line.split(":")[0].strip() in ("vendor_id", "cpu family", "model", "model name", "stepping",
                                            "cache size", "flags")]
    identity = [*cpu, str(os.cpu_count()), str(torch.get_num_threads()), torch.__version__,
                torch.__config__.show(), repr([tuple(w.shape) for w in weights])]
    return hashlib.sha256("\0".join(identity).encode()).hexdigest()[:32]


def _recorded(record: Path | None, key: str) -> CpuLinear | None:
    """The choice recorded for key, if the file holds a valid one."""
    entry = _read_records(record).get(key)
    try:
        return CpuLinear(tuple(entry["ways"])) if isinstance(entry, dict) else None
    except (TypeError, ValueError):
        return None  # a file from another version or damaged: measure again


def _measure_and_record(weights: Sequence[torch.Tensor], record: Path | None, key: str) -> CpuLinear:
    times = _pass_times(weights)
    chosen = CpuLinear(tuple(_fastest_way(times, index) for index in range(len(ROUTE_ROWS))))
    if record is not None:
        entry = {"ways": list(chosen.ways), "recorded_at": time.time(),
                 "pass_ms": {f"{rows} rows": {way: round(1000 * s, 2) for way, s in by_way.items()}
                             for rows, by_way in zip(ROUTE_ROWS, times)}}
        _write_records(record, key, entry)
    return chosen


def _read_records(record: Path | None) -> dict:
    if record is None:
        return {}
    try:
        records = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _write_records(record: Path, key: str, entry: dict) -> None:
    """Adds entry under key (the newest MAX_RECORDS kept), replacing the file at once; an unwritable place is
    skipped (the choice then holds for this process only)."""
    records = {k: v for k, v in _read_records(record).items() if isinstance(v, dict) and k != key}
    records[key] = entry
    newest = sorted(records, key=lambda k: records[k].get("recorded_at", 0), reverse=True)[:MAX_RECORDS]
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=record.parent, prefix=record.name, delete=False) as out:
            json.dump({k: records[k] for k in newest}, out, indent=1)
        os.replace(out.name, record)
    except OSError:
        pass


def _pass_times(weights: Sequence[torch.Tensor]) -> list[dict[str, float]]:
    """Per ROUTE_ROWS entry: seconds per pass over weights for each way, the median of NUM_ROUNDS rounds in
    which the ways take turns (so a slow moment of the machine hits them alike)."""
    ways = [way for way in WAYS if way != "onednn" or _ONEDNN_LINEAR is not None]
    times = []
    for num_rows in ROUTE_ROWS:
        inputs = {k: torch.randn(num_rows, k) for k in {w.shape[1] for w in weights}}
        rounds: dict[str, list[float]] = {way: [] for way in ways}
        for round_index in range(NUM_ROUNDS + 1):  # round 0 warms up
            for way in ways:
                seconds = _pass_s(weights, CpuLinear((way,) * len(ROUTE_ROWS)), inputs)
                if round_index:
                    rounds[way].append(seconds)
        times.append({way: statistics.median(ts) for way, ts in rounds.items()})
    return times


def _fastest_way(times: list[dict[str, float]], index: int) -> str:
    """The way for ROUTE_ROWS[index] rows: the default unless another is MIN_GAIN times as fast."""
    by_way = times[index]
    default, best = DEFAULT_WAYS[index], min(by_way, key=by_way.__getitem__)
    return best if by_way[default] >= MIN_GAIN * by_way[best] else default


def _pass_s(weights: Sequence[torch.Tensor], linear: CpuLinear, inputs: dict[int, torch.Tensor]) -> float:
    """Seconds for one pass of linear over weights (inputs: [rows, K] for each K of the weights)."""
    with torch.inference_mode():
        started = time.perf_counter()
        for w in weights:
            linear(inputs[w.shape[1]], w)
        return time.perf_counter() - started

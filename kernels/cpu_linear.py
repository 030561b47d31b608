"""float32 matmuls on CPU, x [M, K] @ weight [N, K].T, by the way that is fastest on this machine for M rows.

Every decode step streams all the weights from memory, and at few rows the three ways torch offers differ by up
to 2.6x, in an order that depends on the CPU and the BLAS build:
- "transposed": weight @ x.T (MKL's GEMM the other way round; one row goes as two);
- "mkl": F.linear (MKL's x @ weight.T; at one row a GEMV);
- "onednn": oneDNN's linear (torch.ops.mkldnn._linear_pointwise, what torch.compile's CPU backend calls).
On the 2-core CPU machine of 2026-12-05, SmolLM2's layers and LM head at 1 / 2 / 4 rows took 43.5 / 78.0 / 62.1 ms
as "mkl" and 19.4 / 18.3 / 26.0 ms as "transposed"; on that machine's successor of 2026-12-07 (another Xeon, same
torch) 24.4 / 26.5 / 43.6 ms as "mkl" and 62.7 / 60.0 / 57.5 ms as "transposed" (`python -m bench.cpu_matmul`).
So the way per row count is measured once per process over the model's own weights (CpuLinear.measured), and a
way replaces the default only when it is clearly faster (MIN_GAIN): close calls keep the default, so processes
on one machine choose alike (different ways round differently in the last bits).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

WAYS = ("transposed", "mkl", "onednn")
ROUTE_ROWS = (1, 2, 4)  # a way for each row count up to these (3 rows go as 4's); beyond: oneDNN (measured on
# both machines: 1.15-1.5x F.linear from 8 rows on, far ahead of "transposed")
DEFAULT_WAYS = ("transposed", "transposed", "transposed")
# A measured way replaces the default only if the default takes this many times as long: far from the ratios
# seen at close calls (1.3-1.46 at 4 rows on the machine of 2026-12-07), far under the clear ones (2.2-4.3).
MIN_GAIN = 1.8
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
    def measured(cls, weights: Sequence[torch.Tensor], repeats: int = 2) -> "CpuLinear":
        """The ways for this machine: per row count, each way times passes over all of weights (float32 [N, K]
        on CPU, as a decode step streams them), median of repeats after a warm-up. Remembered per process for
        the same weight shapes and thread count; weights under MIN_MEASURED_BYTES get the default ways."""
        if sum(w.numel() * w.element_size() for w in weights) < MIN_MEASURED_BYTES:
            return cls()  # cache-resident: timings would say nothing about a step that streams its weights
        key = (tuple(tuple(w.shape) for w in weights), torch.get_num_threads(), repeats)
        if key not in _MEASURED:  # timing depends on the shapes, not the values: no tensor is kept
            _MEASURED[key] = cls(tuple(_fastest_way(weights, index, repeats) for index in range(len(ROUTE_ROWS))))
        return _MEASURED[key]


_MEASURED: dict[tuple[object, ...], CpuLinear] = {}  # per process: the machine does not change under it


def _fastest_way(weights: Sequence[torch.Tensor], index: int, repeats: int) -> str:
    """The way for ROUTE_ROWS[index] rows: the default unless another is MIN_GAIN times as fast."""
    times = {way: _pass_s(weights, CpuLinear((way,) * len(ROUTE_ROWS)), ROUTE_ROWS[index], repeats)
             for way in WAYS if way != "onednn" or _ONEDNN_LINEAR is not None}
    default, best = DEFAULT_WAYS[index], min(times, key=times.__getitem__)
    return best if times[default] >= MIN_GAIN * times[best] else default


def _pass_s(weights: Sequence[torch.Tensor], linear: CpuLinear, num_rows: int, repeats: int) -> float:
    inputs = {k: torch.randn(num_rows, k) for k in {w.shape[1] for w in weights}}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up
            started = time.perf_counter()
            for w in weights:
                linear(inputs[w.shape[1]], w)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])

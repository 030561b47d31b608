"""Small-batch matmul y = x @ W.T (+ bias) for decode: x [M, K] with M <= MAX_M, W [N, K] row-major
fp16/bf16, fp32 accumulation, y [M, N] in x's dtype (the same function as F.linear). Launch configs,
validation and the entry point are here; the Triton kernels are in kernels/gemv_triton.py.

At decode batch 1 a matmul is bound by reading W once; cuBLAS reads it well under the copy bandwidth for
some decode shapes. These kernels stream W in [BLOCK_N, BLOCK_K] tiles contiguous along K (16-byte loads)
with many programs per SM, and read each weight tile once for all M input rows.

Decisions:
- Two kernels. "fma" (M <= 2 by default): multiply-adds on CUDA cores, one fp32 accumulator per input row
  (M is a compile-time constant): [BLOCK_N, BLOCK_K], reduced along K once at the end, or [BLOCK_N], reduced
  every step (GemvConfig.deferred_reduce). "dot"/"dot_swapped" (M >= 3): tl.dot of the weight tile with the
  inputs padded to 16 rows; at 3-8 rows the multiply-adds would outrun the CUDA cores (H100 sweep: 2x slower).
- Rows past N (and padded inputs past M) are clamped to the last valid row for loading (no masks in the hot
  loop) and masked only on the store. K is masked only when the splits do not tile K exactly (EVEN_K).
- Split-K (when N / BLOCK_N gives too few programs) writes fp32 partials [splits, M, N] and a second kernel
  sums them in a fixed order, adds the bias and casts: deterministic, and no zero-fill as atomics would need.
- The launch config is a GemvConfig picked by choose_config from (M, N, K) and the SM count: deterministic,
  no autotuning and no host-device synchronisation, so gemv can run inside CUDA-graph capture (after one call
  outside capture has compiled the kernel for that config, dtype and M).
- Weight row offsets are int64 (N * K may exceed 2**31 for large vocabularies).
- Triton is optional: without it this module still imports, supports() is False and gemv raises.
  With TRITON_INTERPRET=1 set before import, gemv also runs on CPU tensors (Triton's interpreter), for tests.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from pie_server.kernels.gemv_triton import triton
from pie_server.kernels.launch import interpreting as _interpreting
if triton is not None:  # (without Triton, supports() is False and gemv raises)
    from pie_server.kernels.gemv_triton import _gemv_dot_kernel, _gemv_kernel, _split_k_reduce_kernel

MAX_M = 8
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_NUM_SMS = 132  # H100 SXM; gemv reads the real count off the device
_POW2_WARPS = (1, 2, 4, 8, 16)
_REDUCE_BLOCK = 1024  # elements per program of the split-K reduction
_DOT_BLOCK_M = 16  # tl.dot's smallest tile: inputs are padded (clamped) to 16 rows
MODES = ("fma", "dot", "dot_swapped")


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration. block_n / block_k: the weight tile a program loads per step (powers of two);
    split_k: at most how many programs share one row block's K range (1 = one kernel, no reduction pass);
    deferred_reduce: accumulate [BLOCK_N, BLOCK_K] products per input row and reduce along K once at the end
    (no shuffles in the loop, M times the registers) instead of reducing every step (mode "fma" only);
    mode: "fma" (multiply-adds on CUDA cores, one accumulator per input row), "dot" (tl.dot of the inputs,
    padded to 16 rows, with the weight tile transposed) or "dot_swapped" (tl.dot of the weight tile with the
    transposed inputs: the weight is the MMA's 'M' side)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    deferred_reduce: bool = True
    mode: str = "fma"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "fma" and self.block_n < 16:
            raise ValueError(f"tl.dot needs block_n >= 16, got {self.block_n}")
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value}")
        if self.block_k < 16:
            raise ValueError(f"block_k must be at least 16, got {self.block_k}")
        if self.block_n * self.block_k > 32768:
            raise ValueError(f"tile {self.block_n}x{self.block_k} is too large (at most 32768 elements)")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.num_warps not in _POW2_WARPS:
            raise ValueError(f"num_warps must be one of {_POW2_WARPS}, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    def num_programs(self, n: int) -> int:
        return -(-n // self.block_n) * self.split_k

    def fp32_values_per_thread(self, m: int) -> int:
        """Accumulator plus weight-tile registers a thread holds (the kernel's register pressure)."""
        tile = self.block_n * self.block_k // (32 * self.num_warps)
        return tile * (m + 1) if self.deferred_reduce else tile + m * self.block_n


_LATENCY_BOUND_ELEMENTS = 2 << 20  # weights under 4 MB (bf16) take a few microseconds: launch-bound, not HBM-bound


def _dividing_block_k(k: int) -> int:
    """The largest of 1024..32 that divides K (no tail masks); else 256 (masked tail), or less for tiny K."""
    for block_k in (1024, 512, 256, 128, 64, 32):
        if k % block_k == 0:
            return block_k
    return max(16, min(256, 1 << (k - 1).bit_length()))


@functools.lru_cache(maxsize=1024)
def choose_config(m: int, n: int, k: int, num_sms: int = DEFAULT_NUM_SMS) -> GemvConfig:
    """The launch config for y[m, n] = x[m, k] @ W[n, k].T: a deterministic function of its arguments,
    fitted to an H100 sweep (python -m bench.gpu_gemv --sweep; bf16, every model shape, M = 1, 2, 4, 8).

    - M <= 2, "fma": small tiles, many resident programs (>= 4 per SM), 16-byte loads along K. K blocks
      divide K; a small matrix with K <= 1024 instead reads each row in one masked step (it is launch-bound).
      K blocks of 1024: 4 rows (8 warps at M = 1, 4 at M = 2); smaller K blocks: tiles of 512 * M elements
      at 4 warps. Accumulation is deferred (M + 1 tiles of registers). Split-K when row blocks < SMs.
    - M >= 3, "dot_swapped": the multiply-adds of 3-8 rows outrun the CUDA cores, so a 64-row weight tile
      goes through tl.dot against the inputs padded to 16 columns, 4 pipeline stages; split-K only for
      matrices of few row blocks (under a quarter of the SMs) and long K.
    """
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"shape must be positive, got m={m}, n={n}, k={k}")
    if m >= 3:
        return _dot_config(n, k, num_sms)
    if n * k < _LATENCY_BOUND_ELEMENTS and k <= 1024:
        block_k, num_warps = max(16, 1 << (k - 1).bit_length()), 4
        block_n = 2 if n < 2048 else 4
    else:
        block_k = _dividing_block_k(k)
        num_warps = 8 if m == 1 and block_k == 1024 else 4
        block_n = 4 if block_k == 1024 else max(1, 512 * m // block_k)
        while block_n > 1 and -(-n // block_n) < 4 * num_sms:
            block_n //= 2
    split_k = _split_for(-(-n // block_n), -(-k // block_k), min_row_blocks=num_sms, min_k_blocks=2)
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=1,
                      deferred_reduce=True)


def _dot_config(n: int, k: int, num_sms: int) -> GemvConfig:
    block_n = 64
    block_k = 256 if k % 256 == 0 and k >= 2048 else 128
    split_k = _split_for(-(-n // block_n), -(-k // block_k), min_row_blocks=num_sms // 4, min_k_blocks=3)
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=4,
                      mode="dot_swapped")


def _split_for(row_blocks: int, num_k_blocks: int, min_row_blocks: int, min_k_blocks: int) -> int:
    """Split K only when there are fewer than min_row_blocks row blocks, into splits of >= min_k_blocks
    K blocks each, so that row blocks x splits reaches about the SM count that min_row_blocks stands for."""
    if row_blocks >= min_row_blocks:
        return 1
    return max(1, min(8, num_k_blocks // min_k_blocks, -(-min_row_blocks // row_blocks)))


def candidate_configs(m: int, n: int, k: int, num_sms: int = DEFAULT_NUM_SMS) -> list[GemvConfig]:
    """The configs a sweep times for one shape (the heuristic's pick first). "fma": tiles of 512-16K
    elements, 4 or 8 warps, deferred or per-step reduction within a register budget; for M >= 3 also "dot"
    and "dot_swapped" tiles of 32-128 rows with 3-6 pipeline stages that fit in shared memory; split-K where
    the row blocks alone leave SMs idle."""
    seen: dict[GemvConfig, None] = {choose_config(m, n, k, num_sms): None}
    max_block_k = max(16, 1 << (k - 1).bit_length())
    for block_n, block_k in itertools.product((1, 2, 4, 8, 16, 32), (64, 128, 256, 512, 1024)):
        if block_k > max_block_k or not 512 <= block_n * block_k <= 16384:
            continue
        for split_k, num_warps, deferred in itertools.product(_splits(n, k, block_n, block_k, 4 * num_sms, 2),
                                                              (4, 8), (True, False)):
            config = GemvConfig(block_n, block_k, split_k, num_warps, 1, deferred)
            if config.fp32_values_per_thread(m) <= 160 and (deferred or m > 1):
                seen[config] = None
    for block_n, block_k in itertools.product((32, 64, 128), (64, 128, 256)):
        if m < 3 or block_k > max_block_k:
            continue
        for split_k, mode, num_stages in itertools.product(_splits(n, k, block_n, block_k, 2 * num_sms, 3),
                                                           ("dot", "dot_swapped"), (3, 4, 6)):
            if (block_n + 16) * block_k * 2 * num_stages <= 192 << 10:  # shared memory of the pipeline
                seen[GemvConfig(block_n, block_k, split_k, 4, num_stages, mode=mode)] = None
    return list(seen)


def _splits(n: int, k: int, block_n: int, block_k: int, max_programs: int, min_k_blocks: int) -> list[int]:
    row_blocks = -(-n // block_n)
    return [1] + [s for s in (2, 4, 8) if row_blocks * s <= max_programs and k // block_k >= min_k_blocks * s]


# -- validation ----------------------------------------------------------------------------------------


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where gemv should replace F.linear: Triton present, CUDA tensors of one fp16/bf16 dtype,
    1 <= M <= MAX_M, contiguous weight, and K a multiple of 8 (16-byte rows, so loads vectorise)."""
    if triton is None or x.device.type != "cuda" or x.device != weight.device:
        return False
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        return False
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return False
    return 1 <= x.shape[0] <= MAX_M and weight.is_contiguous() and weight.shape[1] % 8 == 0


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)}, weight is {tuple(weight.shape)}")
    if not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"gemv takes 1..{MAX_M} input rows, got {x.shape[0]}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must be non-empty, got {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {SUPPORTED_DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"gemv runs on CUDA tensors, got {x.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (row-major [N, K])")
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be [{weight.shape[0]}] {x.dtype} on {x.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if triton is None:
        raise RuntimeError("gemv needs Triton, which is not installed")


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# -- the entry point -----------------------------------------------------------------------------------


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= MAX_M; config overrides choose_config (benchmarks)."""
    _check_inputs(x, weight, bias)
    m, k = x.shape
    n = weight.shape[0]
    if config is None:
        config = choose_config(m, n, k, _num_sms(x.device))
    x = x if x.stride(1) == 1 else x.contiguous()  # rows may be strided; each row must be contiguous
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per_split, num_splits = split_layout(k, config)
    grid = (-(-n // config.block_n), num_splits)
    meta = dict(BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % k_per_split == 0,
                num_warps=config.num_warps, num_stages=config.num_stages)
    if config.mode == "fma":
        kernel, meta = _gemv_kernel, dict(meta, NUM_M=m, DEFERRED=config.deferred_reduce)
    else:
        kernel, meta = _gemv_dot_kernel, dict(meta, BLOCK_M=_DOT_BLOCK_M, SWAP_AB=config.mode == "dot_swapped")
    bias_or_dummy = bias if bias is not None else y  # never read when HAS_BIAS is False
    if num_splits == 1:
        kernel[grid](x, weight, bias_or_dummy, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0), 0,
                     k_per_split, HAS_BIAS=bias is not None, **meta)
        return y
    partials = torch.empty((num_splits, m, n), dtype=torch.float32, device=x.device)
    kernel[grid](x, weight, bias_or_dummy, partials, m, n, k, x.stride(0), weight.stride(0), n, m * n,
                 k_per_split, HAS_BIAS=False, **meta)
    _split_k_reduce_kernel[(-(-(m * n) // _REDUCE_BLOCK),)](
        partials, bias_or_dummy, y, m * n, n, SPLIT_K=num_splits, BLOCK=_REDUCE_BLOCK, HAS_BIAS=bias is not None,
        num_warps=4)
    return y


def split_layout(k: int, config: GemvConfig) -> tuple[int, int]:
    """(K elements per split, number of splits launched): each split but the last covers the same whole
    number of K blocks, and every launched split is non-empty (so at most config.split_k of them)."""
    num_k_blocks = -(-k // config.block_k)
    blocks_per_split = -(-num_k_blocks // config.split_k)
    return blocks_per_split * config.block_k, -(-num_k_blocks // blocks_per_split)

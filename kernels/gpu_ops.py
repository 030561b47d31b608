"""Elementwise kernels of the decoder on CUDA through FlashInfer: same functions and signatures as
kernels/ops.py (the torch reference), so LlamaModel takes either module as `ops`.

Decisions:
- RMSNorm, fused add+RMSNorm, RoPE and SiLU-and-mul are single FlashInfer kernels (the torch versions launch
  3-8 kernels each and round-trip float32 intermediates through memory).
- add_rms_norm and apply_rope work IN PLACE: add_rms_norm overwrites `x` with the normed sum and `residual`
  with the sum; apply_rope rotates q and k where they lie (they may be strided views of one qkv tensor).
  The decoder passes temporaries it never reads again, so the results equal the reference's.
- single_row_linear (decode at batch 1) is the Triton GEMV of kernels/gemv.py: it reads the weights at
  2.5-3.2 TB/s where cuBLAS reaches 2.2-2.8 on the H100 (bench/gpu_gemv.py). Its Python launch costs tens of
  microseconds, so the decoder uses it only inside CUDA graphs and for the LM head (engine/model/llama.py).
- rms_norm_linear, rms_norm_gated_linear, rms_norm_qkv_rope_append and linear_add_ fold RMSNorm, SiLU-and-mul,
  RoPE with the KV append, and the residual add into the GEMV at one row (kernels/gemv_fused.py; the decoder's
  batch-1 graphs); other shapes compose the kernels above.
- Numerics: sums of squares and rotations are computed in float32, rounded once to the input dtype
  (the reference rounds the normalised value before multiplying by the weight: one bf16 ulp apart).
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")  # nvcc-built norm kernels, not the CuTe-DSL ones
import flashinfer  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pie_server.kernels import gemv as _gemv  # noqa: E402
from pie_server.kernels import gemv_fused as _fused  # noqa: E402
from pie_server.kernels.kv_append import append_kv as _append_kv  # noqa: E402

from pie_server.kernels.ops import rope_cos_sin_cache, rope_inv_freq  # noqa: F401  (host-side, shared with the reference)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, H] -> [T, H]."""
    return flashinfer.norm.rmsnorm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual'), both written in place."""
    flashinfer.norm.fused_add_rmsnorm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate then up) -> [T, I]."""
    return flashinfer.activation.silu_and_mul(gate_up)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary embedding in place. q [T, Hq, D], k [T, Hkv, D] (last dim contiguous),
    positions [T] int32/int64, cos_sin_cache [max_positions, D] float32 (cos | sin)."""
    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, q.shape[-1], cos_sin_cache,
                                                          is_neox=True)
    return q, k


def single_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K].T (+ bias) through the Triton GEMV where it applies, else cuBLAS."""
    if _gemv.supports(x, weight):
        return _gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(rms_norm(x), weight, bias)."""
    if _fused.fused_config(x, weight) is not None:
        return _fused.rms_norm_gemv(x, norm_weight, eps, weight, bias)
    return _linear(rms_norm(x, norm_weight, eps), weight, bias)


def rms_norm_gated_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(F.linear(rms_norm(x), weight, bias)), weight [2I, H] -> [T, I]."""
    if _fused.fused_config(x, weight, gated=True) is not None:
        return _fused.rms_norm_gated_gemv(x, norm_weight, eps, weight, bias)
    return silu_and_mul(rms_norm_linear(x, norm_weight, eps, weight, bias))


def linear_add_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor) -> torch.Tensor:
    """residual += F.linear(x, weight, bias), in place; returns residual."""
    if _fused.fused_config(x, weight) is not None and residual.is_contiguous():
        return _fused.gemv_add_(x, weight, bias, residual)
    return residual.add_(_linear(x, weight, bias))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return single_row_linear(x, weight, bias) if x.shape[0] == 1 else F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (cuBLAS); one-row GEMVs are chosen by the model in graph mode (single_row_linear)."""
    return F.linear(x, weight, bias)


def rms_norm_qkv_rope_append(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                             bias: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                             kv_cache: torch.Tensor, write_index: torch.Tensor, num_q_heads: int,
                             num_kv_heads: int) -> torch.Tensor:
    """qkv projection of rms_norm(x), RoPE, K/V written to kv_cache; returns the rotated q [T, Hq, D]."""
    head_dim = kv_cache.shape[-1]
    if _fused.qkv_rope_config(x, weight, head_dim) is not None:
        return _fused.rms_norm_qkv_rope_append(x, norm_weight, eps, weight, bias, positions, cos_sin_cache,
                                               kv_cache, write_index, num_q_heads, num_kv_heads)
    qkv = rms_norm_linear(x, norm_weight, eps, weight, bias)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    num_tokens = x.shape[0]
    q, k = apply_rope(q.reshape(num_tokens, num_q_heads, head_dim), k.reshape(num_tokens, num_kv_heads, head_dim),
                      positions, cos_sin_cache)
    _append_kv(kv_cache, k, v.reshape(num_tokens, num_kv_heads, head_dim), write_index)
    return q

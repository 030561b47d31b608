"""Elementwise kernels of the decoder, torch reference versions (CPU, and the CUDA fallback).

Shapes: T tokens, H hidden size, Hq/Hkv heads, D head_dim, I intermediate size.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from pie_server.kernels.cpu_linear import CpuLinear


class RopeParams(Protocol):
    """The RoPE parameters these kernels read (engine.config.RopeConfig has them; kernels import nothing from
    the engine)."""

    theta: float
    rope_type: str  # "default", "linear" or "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


_DEFAULT_LINEAR = CpuLinear()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K], weight [N, K] -> [M, N] (contiguous): on CPU in float32 by the
    default ways of kernels/cpu_linear.py (the executor gives the model the ways measured on its machine);
    bf16 and CUDA keep F.linear."""
    return _DEFAULT_LINEAR(x, weight, bias)


def single_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K].T (+ bias): linear() here; a GEMV kernel on CUDA (kernels/gpu_ops.py)."""
    return linear(x, weight, bias)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(rms_norm(x), weight, bias): one fused kernel on CUDA at one row (kernels/gemv_fused.py)."""
    return F.linear(rms_norm(x, norm_weight, eps), weight, bias)


def rms_norm_gated_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(F.linear(rms_norm(x), weight, bias)), weight [2I, H] (gate rows, then up rows) -> [T, I]."""
    return silu_and_mul(F.linear(rms_norm(x, norm_weight, eps), weight, bias))


def rms_norm_qkv_rope_append(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                             bias: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                             kv_cache: torch.Tensor, write_index: torch.Tensor, num_q_heads: int,
                             num_kv_heads: int) -> torch.Tensor:
    """The qkv projection of rms_norm(x), RoPE, and k/v written to kv_cache [P, 2, S, Hkv, D] (token t at page
    write_index[t], offset write_index[T + t]): returns the rotated q [T, Hq, D]. One kernel on CUDA at one
    row (kernels/gemv_fused.py)."""
    num_tokens, head_dim = x.shape[0], kv_cache.shape[-1]
    qkv = rms_norm_linear(x, norm_weight, eps, weight, bias)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = apply_rope(q.reshape(num_tokens, num_q_heads, head_dim), k.reshape(num_tokens, num_kv_heads, head_dim),
                      positions, cos_sin_cache)
    pages, offsets = write_index[:num_tokens], write_index[num_tokens:2 * num_tokens]
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.reshape(num_tokens, num_kv_heads, head_dim).to(kv_cache.dtype)
    return q


def linear_add_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor) -> torch.Tensor:
    """residual += F.linear(x, weight, bias), in place; returns residual."""
    return residual.add_(F.linear(x, weight, bias))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, H] -> [T, H], computed in float32 like transformers."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual')."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate then up) -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_inv_freq(rope: RopeParams, head_dim: int) -> torch.Tensor:
    """[D/2] float32 inverse frequencies after the configured scaling."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeParams) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short kept, a smooth blend between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin_cache(rope: RopeParams, head_dim: int, max_positions: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_positions, D] float32: cos in the first D/2 columns, sin in the last (FlashInfer's layout)."""
    inv_freq = rope_inv_freq(rope, head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style (rotate-half) rotary embedding. q [T, Hq, D], k [T, Hkv, D], positions [T] int64."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

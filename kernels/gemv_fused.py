"""One-row matmuls with their neighbours fused in (decode at batch 1 inside CUDA graphs).

A decoder layer at batch 1 is six weight reads; everything between them (RMSNorm, SiLU-and-mul, residual
adds) is a kernel of ~3 us that reads a few kilobytes, plus a launch gap: ~0.4 ms per step for Llama-3.1-8B,
8% of the weights' read time. Folded into the GEMV of kernels/gemv_triton.py (_gemv_fused_kernel):
- rms_norm_gemv: y = rms_norm(x, nw) @ W.T. rms_norm(x) * nw @ W.T = (1/rms(x)) * ((x * nw) @ W.T), so each
  program multiplies x * nw into its products and gathers x's sum of squares in the same loop (it reads all
  of x anyway): no pass before the matmul, no normalised copy of x.
- rms_norm_gated_gemv: silu(gate) * up of the gate_up projection: each program reads matching gate and up rows
  (same bytes per program as the plain GEMV) and writes the activation, never the [2I] pre-activation.
- rms_norm_qkv_rope_append: the qkv projection of one token, with RoPE and the KV append in its epilogue: a
  program takes matching rows of both halves of a head (each rotary pair), rotates q and k, and writes q to
  the output and k, v to their cache slot: no separate RoPE or append kernel.
- gemv_add_: residual += x @ W.T in place (the o and down projections), which makes the add of the next
  fused add-RMSNorm redundant.
Numerics: fp32 throughout; the matmul output is rounded to the dtype before SiLU and before the residual add,
as the unfused kernels round it; the normalised input is not rounded (one rounding fewer than unfused).

Launched with PDL on Hopper (kernels/launch.py): scheduled while the previous kernel drains, each program waits
for it before its loop, and lets the next kernel launch after its loop (H100, 8B batch 1: 0.16 ms less per
step; reading the first weight tile before the wait measured slower).

Each program covers the whole K range, so these apply where the GEMV heuristic picks no split-K
(fused_config): every Llama-3.1-8B and SmolLM2 decode matmul on an H100. kernels/gpu_ops.py falls back to the
unfused kernels elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pie_server.kernels import gemv as _gemv
from pie_server.kernels.gemv import GemvConfig
from pie_server.kernels.launch import uses_pdl

if _gemv.triton is not None:
    from pie_server.kernels.gemv_triton import _gemv_fused_kernel


# Every program reads all of x (and the norm weight) besides its weight rows: taller tiles amortise those
# reads. H100 sweep (python -m bench.gpu_gemv_fused --sweep, bench/results/gpu_gemv_fused.json): 8 rows x
# 1024 columns at 4 warps is the fastest tile over the four Llama-3.1-8B matrices, 156 us per layer against
# 163 us with the plain GEMV's tiles (plain GEMV: 152 us). Used wherever the plain GEMV's pick has K blocks
# of 1024; smaller matrices (SmolLM2) keep that pick.
FUSED_TILE = GemvConfig(block_n=8, block_k=1024, split_k=1, num_warps=4, num_stages=1)


def fused_config(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> GemvConfig | None:
    """The launch config for one row of x against weight, or None where the fused kernels do not apply:
    not a one-row GEMV that kernels.gemv supports, or one it would split along K."""
    if x.shape[0] != 1 or not _gemv.supports(x, weight) and not _interpreted_cpu(x, weight):
        return None
    if gated and weight.shape[0] % 2:
        return None
    config = _gemv.choose_config(1, weight.shape[0], weight.shape[1], _gemv._num_sms(x.device))
    if config.mode != "fma" or _gemv.split_layout(weight.shape[1], config)[1] != 1:
        return None
    if config.block_k == FUSED_TILE.block_k:
        return FUSED_TILE
    return config


def qkv_rope_config(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> GemvConfig | None:
    """fused_config for rms_norm_qkv_rope_append: also None where a tile's rotary pairs do not divide D/2."""
    config = fused_config(x, weight)
    if config is None or head_dim % 2 or (head_dim // 2) % max(1, config.block_n // 2):
        return None
    return config


def _interpreted_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Under TRITON_INTERPRET=1 (CPU tests) the kernels take CPU tensors."""
    return _gemv._interpreting() and _gemv.triton is not None and x.device.type == "cpu" and \
        x.dtype in _gemv.SUPPORTED_DTYPES and weight.dtype == x.dtype and weight.is_contiguous()


# `config` (benchmarks) overrides fused_config's pick; its block_n counts weight rows per program.


def rms_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """F.linear(rms_norm(x, norm_weight, eps), weight, bias) for x [1, K] -> [1, N]."""
    _check_norm(x, norm_weight)
    return _launch(x, weight, bias, norm_weight, eps, None, False, config)


def rms_norm_gated_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """silu_and_mul(F.linear(rms_norm(x, norm_weight, eps), weight, bias)) for x [1, K], weight [2N, K]
    (gate rows, then up rows) -> [1, N]."""
    _check_norm(x, norm_weight)
    return _launch(x, weight, bias, norm_weight, eps, None, True, config)


def gemv_add_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
              config: GemvConfig | None = None) -> torch.Tensor:
    """residual += F.linear(x, weight, bias) in place, x [1, K], residual [1, N] contiguous; returns residual."""
    if residual.shape != (1, weight.shape[0]) or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be a contiguous [1, {weight.shape[0]}] {x.dtype} tensor, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    _launch(x, weight, bias, None, 0.0, residual, False, config)
    return residual


def _check_norm(x: torch.Tensor, norm_weight: torch.Tensor) -> None:
    if norm_weight.shape != (x.shape[-1],) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm weight must be [{x.shape[-1]}] {x.dtype}, got {tuple(norm_weight.shape)} "
                         f"{norm_weight.dtype}")


@dataclass(frozen=True)
class _RopeTarget:
    """Where rms_norm_qkv_rope_append's epilogue puts its results (see there)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    kv_cache: torch.Tensor
    write_index: torch.Tensor
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def rms_norm_qkv_rope_append(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                             bias: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                             kv_cache: torch.Tensor, write_index: torch.Tensor, num_q_heads: int,
                             num_kv_heads: int, config: GemvConfig | None = None) -> torch.Tensor:
    """The qkv projection of one token with RoPE and the KV append in its epilogue: returns the rotated q
    [1, Hq, D]; k (rotated) and v go to kv_cache [P, 2, S, Hkv, D] at page write_index[0], offset
    write_index[1]. weight [(Hq + 2 Hkv) D, K]; positions [1] int64; cos_sin_cache [max_positions, D] float32
    (cos | sin, kernels/ops.py's layout); write_index [2] int64 on the device."""
    _check_norm(x, norm_weight)
    head_dim = kv_cache.shape[-1] if kv_cache.dim() == 5 else 0
    rope = _RopeTarget(positions, cos_sin_cache, kv_cache, write_index, num_q_heads, num_kv_heads, head_dim)
    _check_rope(x, weight, rope)
    out = _launch(x, weight, bias, norm_weight, eps, None, False, config, rope)
    return out[:, :num_q_heads * head_dim].view(1, num_q_heads, head_dim)


def _check_rope(x: torch.Tensor, weight: torch.Tensor, rope: _RopeTarget) -> None:
    cache, d = rope.kv_cache, rope.head_dim
    if cache.dim() != 5 or cache.shape[1] != 2 or cache.shape[3] != rope.num_kv_heads or not cache.is_contiguous() \
            or cache.dtype != x.dtype or cache.device != x.device:
        raise ValueError(f"kv_cache must be a contiguous [P, 2, S, {rope.num_kv_heads}, D] {x.dtype} tensor on "
                         f"{x.device}, got {tuple(cache.shape)} {cache.dtype}")
    if d % 2 or weight.shape[0] != (rope.num_q_heads + 2 * rope.num_kv_heads) * d:
        raise ValueError(f"weight has {weight.shape[0]} rows, want (Hq + 2 Hkv) * D for an even D = {d}")
    if rope.positions.shape != (1,) or rope.write_index.shape != (2,) or rope.positions.device != x.device \
            or rope.write_index.device != x.device:
        raise ValueError("positions must be [1] and write_index [2], on x's device")
    if rope.cos_sin_cache.dim() != 2 or rope.cos_sin_cache.shape[1] != d or \
            rope.cos_sin_cache.dtype != torch.float32 or not rope.cos_sin_cache.is_contiguous():
        raise ValueError(f"cos_sin_cache must be a contiguous [max_positions, {d}] float32 tensor")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
            eps: float, residual: torch.Tensor | None, gated: bool, override: GemvConfig | None,
            rope: _RopeTarget | None = None) -> torch.Tensor:
    config = fused_config(x, weight, gated)
    if config is not None and override is not None:
        config = override
    if config is None:
        raise ValueError(f"no fused GEMV for x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
                         f"{tuple(weight.shape)} (see fused_config)")
    _gemv._check_inputs(x, weight, bias)
    n, k = weight.shape
    paired = gated or rope is not None  # two rows per output: gate/up, or a rotary pair
    block_n = max(1, config.block_n // 2) if paired else config.block_n  # same weight bytes per program
    num_out = n // 2 if gated else n
    x = x if x.stride(1) == 1 else x.contiguous()
    out = residual if residual is not None else torch.empty((1, num_out), dtype=x.dtype, device=x.device)
    if rope is None:
        up_offset, bias_up_offset, grid, rope_args = num_out * weight.stride(0), num_out, -(-num_out // block_n), \
            (out, out, out, out, 0, 0, 0)
        head_dim, page_size = 2, 1  # (the RoPE arguments are placeholders, never read without ROPE)
    else:
        half = rope.head_dim // 2
        if half % block_n:
            raise ValueError(f"head_dim / 2 = {half} must be a multiple of the tile's {block_n} rotary pairs")
        up_offset, bias_up_offset, grid = half * weight.stride(0), half, n // 2 // block_n
        rope_args = (rope.positions, rope.cos_sin_cache, rope.kv_cache, rope.write_index, rope.num_q_heads,
                     rope.num_kv_heads, rope.kv_cache.stride(0))
        head_dim, page_size = rope.head_dim, rope.kv_cache.shape[2]
    pdl = uses_pdl(x.device)
    _gemv_fused_kernel[(grid,)](
        x, weight, bias if bias is not None else out, norm_weight if norm_weight is not None else x, out, out,
        num_out, k, weight.stride(0), up_offset, bias_up_offset, eps, *rope_args,
        BLOCK_N=block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, GATED=gated, ADD_RESIDUAL=residual is not None, ROPE=rope is not None,
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, USE_PDL=pdl, launch_pdl=pdl, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out

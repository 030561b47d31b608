"""A step's new K/V into the paged cache in one Triton launch: every path that appends K/V itself (eager steps,
the piecewise graphs' pieces, FlashInfer's and Triton's graph-mode decode where no fused RoPE kernel does it).

Assigning through two index tensors (`kv_cache[pages, :, offsets] = pair`) launches PyTorch's elementwise index
kernel, which computes a destination per element: on an H100 it took 122 us a layer for an 8192-token prefill of
the Llama-3.1-8B shape (33 MB of K/V; bench.gpu_throughput --cuda-profile), about six times the copy's time at
the memory bandwidth. Here program (t, w) copies row source_rows[t] (or t) of k (w = 0) or v (w = 1), its
Hkv * D contiguous elements, to slot write_index[T + t] of page write_index[t]: one coalesced row per program.

KV cache (kernels/attention.py): kv_cache [num_pages, 2, page_size, Hkv, D], contiguous, index 0 = K, 1 = V.
Rows that write one slot are the caller's business (as with the indexed assignment, the last write wins in no
defined order; pass source_rows to make them all write the same row). Offsets are int64.

Without Triton, on CPU tensors outside the interpreter, or for a cache of another dtype than k and v,
`append_kv` falls back to the indexed assignment.
"""
from __future__ import annotations

import torch

from pie_server.kernels.launch import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fallback
    triton = None
    tl = None


def append_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_index: torch.Tensor,
              source_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Writes k/v [T, Hkv, D] (row source_rows[t] or t for new token t) to page write_index[t], offset
    write_index[T + t] of kv_cache [P, 2, S, Hkv, D]; no host sync. Returns kv_cache."""
    if not _runs_here(kv_cache, k, v):
        return append_kv_indexed(kv_cache, k, v, write_index, source_rows)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return kv_cache
    row = num_kv_heads * head_dim
    _append_kernel[(num_tokens, 2)](
        k, v, kv_cache, write_index, write_index if source_rows is None else source_rows, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), HEAD_DIM=head_dim, ROW=row, BLOCK=triton.next_power_of_2(row),
        HAS_SOURCE=source_rows is not None, num_warps=4)
    return kv_cache


def _runs_here(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Triton kernel applies: Triton present, CUDA tensors (or the interpreter), one dtype, the cache
    contiguous and each head's D elements contiguous in k and v."""
    if triton is None or (kv_cache.device.type != "cuda" and not interpreting()):
        return False
    return k.dtype == v.dtype == kv_cache.dtype and kv_cache.is_contiguous() and k.stride(2) == 1 \
        and v.stride(2) == 1 and k.shape == v.shape and kv_cache.shape[3:] == k.shape[1:]


def append_kv_indexed(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_index: torch.Tensor,
                      source_rows: torch.Tensor | None) -> torch.Tensor:
    """append_kv through PyTorch's indexed assignment (one kernel, two with source_rows, when v directly follows
    k in memory, as in the decoder's qkv output): the fallback, and the tests' reference."""
    num_tokens = k.shape[0]
    pair = _kv_pair(k, v)  # [T, 2, Hkv, D]
    if source_rows is not None:
        pair = pair.index_select(0, source_rows)
    kv_cache[write_index[:num_tokens], :, write_index[num_tokens:2 * num_tokens]] = pair.to(kv_cache.dtype)
    return kv_cache


def _kv_pair(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[T, 2, Hkv, D]: a view when each token's v row starts where its k row ends, else a stacked copy."""
    num_kv, dim = k.shape[1], k.shape[2]
    adjacent = k.stride() == v.stride() and k.stride()[1:] == (dim, 1) and k.dtype == v.dtype and \
        v.data_ptr() == k.data_ptr() + num_kv * dim * k.element_size()
    if adjacent:
        return k.as_strided((k.shape[0], 2, num_kv, dim), (k.stride(0), num_kv * dim, dim, 1))
    return torch.stack((k, v), dim=1)


if triton is not None:
    @triton.jit
    def _append_kernel(k_ptr, v_ptr, cache_ptr, write_index_ptr, source_ptr, num_tokens,
                       k_stride_t, k_stride_h, v_stride_t, v_stride_h, page_stride, half_stride, slot_stride,
                       HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr, HAS_SOURCE: tl.constexpr):
        t = tl.program_id(0)
        which = tl.program_id(1)  # 0: K, 1: V
        if HAS_SOURCE:
            src_row = tl.load(source_ptr + t).to(tl.int64)
        else:
            src_row = t.to(tl.int64)
        page = tl.load(write_index_ptr + t).to(tl.int64)
        offset = tl.load(write_index_ptr + num_tokens + t).to(tl.int64)
        idx = tl.arange(0, BLOCK)
        mask = idx < ROW
        head, dim = idx // HEAD_DIM, idx % HEAD_DIM
        dst = cache_ptr + page * page_stride + which * half_stride + offset * slot_stride + idx
        if which == 0:
            x = tl.load(k_ptr + src_row * k_stride_t + head * k_stride_h + dim, mask=mask)
        else:
            x = tl.load(v_ptr + src_row * v_stride_t + head * v_stride_h + dim, mask=mask)
        tl.store(dst, x, mask=mask)

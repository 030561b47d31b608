"""Decode-step attention for small batches in Triton: a fused RoPE + KV append, and split-KV paged attention.

Both run inside CUDA graphs: no host-device synchronisation, grids from host-known sizes only, the split
buffers allocated with torch.empty (a captured graph keeps its allocation).

KV cache (kernels/attention.py, one tensor per layer): kv_cache [num_pages, 2, page_size, Hkv, D], contiguous,
index 0 = K, 1 = V. Token j of sequence b lives in page kv_page_ids[kv_page_indptr[b] + j // page_size] at
offset j % page_size.

rope_append (grid (T, Hq + Hkv), one launch): program (t, h < Hq) rotates q[t, h] in place; program
(t, Hq + j) rotates k[s, j] (s = source_rows[t] or t, with positions[s]) and writes it and v[s, j] into t's
slot. NeoX rotate-half in fp32, one rounding: ops.apply_rope's numerics.

decode_attention (split-KV, "flash decoding"):
- Kernel 1, grid (B, Hkv, num_splits): program (b, h, s) takes pages [s * P, (s + 1) * P) of sequence b with
  P = cdiv(num_pages_b, num_splits), computed on the device from kv_page_indptr (so one graph serves every
  length; splits past the last page write a neutral partial: output 0, log-sum-exp -inf). It loads the
  G = Hq / Hkv query rows of KV head h once, padded to BLOCK_G >= 16 rows (tl.dot's smallest tile, masked),
  then walks its pages BLOCK_N tokens at a time (rows gathered through the page ids, tokens past kv_len
  masked), online softmax in fp32 in base 2 (log2(e) folded into the 1/sqrt(D) scale), P rounded to the
  cache dtype for the P @ V product (FlashAttention's choice). It writes fp32 partial outputs
  [B, Hq, S, D] and base-2 log-sum-exps [B, Hq, S]; with num_splits == 1 it writes the output directly.
- Kernel 2, grid (B, Hq): out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m), m = max_s lse_s, over chunks of
  at most 64 splits (online over chunks), cast to q's dtype. Split 0 is never empty, so m is finite.
- Merging in kernel 1 instead (the last split of each (b, h) to finish, found with an atomic counter, merges
  the others: one launch) was built and measured slower on the H100, 12.6 us per Llama-3.1-8B layer at
  batch 1 against 5.1 + 2.0 us for the two kernels: that program merges its G heads in series. Removed.
- Tiles: BLOCK_N = 64 tokens (4 pages of 16; 32 for D = 256) of K and of V per step ([64, 128] bf16 is
  16 KB), 4 warps, 2 stages (cp.async double buffering). Compiled offline for sm_90 at D = 128: 91 registers,
  38 KB shared memory, no spills, 16-byte loads (these need Triton's
  16-divisibility of the pointers and strides, true for the cache and for q as a view of qkv). Decode is
  bound by reading K/V; the many small programs (choose_num_splits) keep loads in flight.
- Offsets into the cache are int64 (a cache may exceed 2**31 elements).

Triton is optional: without it this module imports and both entry points raise RuntimeError. With
TRITON_INTERPRET=1 set before import they also accept CPU tensors (Triton's interpreter, for tests).
"""
from __future__ import annotations

import math

import torch

from pie_server.kernels.launch import interpreting as _interpreting
from pie_server.kernels.launch import uses_pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the entry points raise
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_NUM_SMS = 132  # H100 SXM
_MIN_DOT_ROWS = 16  # tl.dot's smallest M: the query group is padded to it
_MAX_MERGE_CHUNK = 64  # splits merged per step of kernel 2
_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _rotate_half(ptr, offs, cos, sin, HALF: tl.constexpr):
        """The rotated halves (fp32) of the head vector at ptr: [x1 c - x2 s, x2 c + x1 s]."""
        x1 = tl.load(ptr + offs).to(tl.float32)
        x2 = tl.load(ptr + HALF + offs).to(tl.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit
    def _rope_append_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kv_ptr, widx_ptr, src_ptr, num_tokens,
                            num_q_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_cs, HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                            PAGE_SIZE: tl.constexpr, HAS_SOURCE: tl.constexpr):
        """Program (t, h): h < Hq rotates q[t, h] in place; h = Hq + j writes rotated k[s, j] and v[s, j] to t's
        slot, s = source_rows[t] (HAS_SOURCE) or t."""
        HALF: tl.constexpr = HEAD_DIM // 2
        ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM  # one slot of one page plane
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF)
        if h < num_q_heads:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            cos = tl.load(cs_ptr + pos * stride_cs + offs)
            sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs)
            ptr = q_ptr + t.to(tl.int64) * stride_qt + h * stride_qh
            r1, r2 = _rotate_half(ptr, offs, cos, sin, HALF)
            tl.store(ptr + offs, r1.to(q_ptr.dtype.element_ty))
            tl.store(ptr + HALF + offs, r2.to(q_ptr.dtype.element_ty))
        else:
            j = h - num_q_heads
            if HAS_SOURCE:
                src = tl.load(src_ptr + t).to(tl.int64)
            else:
                src = t.to(tl.int64)
            pos = tl.load(pos_ptr + src).to(tl.int64)
            cos = tl.load(cs_ptr + pos * stride_cs + offs)
            sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs)
            page = tl.load(widx_ptr + t).to(tl.int64)
            slot = tl.load(widx_ptr + num_tokens + t).to(tl.int64)
            dst = kv_ptr + page * (2 * PAGE_SIZE * ROW) + slot * ROW + j * HEAD_DIM
            r1, r2 = _rotate_half(k_ptr + src * stride_kt + j * stride_kh, offs, cos, sin, HALF)
            tl.store(dst + offs, r1.to(kv_ptr.dtype.element_ty))
            tl.store(dst + HALF + offs, r2.to(kv_ptr.dtype.element_ty))
            v_src = v_ptr + src * stride_vt + j * stride_vh
            dst_v = dst + PAGE_SIZE * ROW
            tl.store(dst_v + offs, tl.load(v_src + offs).to(kv_ptr.dtype.element_ty))
            tl.store(dst_v + HALF + offs, tl.load(v_src + HALF + offs).to(kv_ptr.dtype.element_ty))

    @triton.jit
    def _decode_split_kernel(q_ptr, kv_ptr, indptr_ptr, page_ids_ptr, last_len_ptr, out_ptr, part_ptr, lse_ptr,
                             stride_qb, stride_qh, stride_ob, stride_oh, num_q_heads, num_splits,
                             qk_scale, HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             BLOCK_G: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGES_PER_BLOCK: tl.constexpr,
                             DIRECT: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (b, h, s): attention of KV head h's query group of sequence b over split s of its pages.
        USE_PDL: the page table (written before the step) is read before waiting for the kernel that wrote q and
        the new K/V."""
        ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
        PLANE: tl.constexpr = PAGE_SIZE * ROW  # K (or V) of one page
        BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        page_start = tl.load(indptr_ptr + b)
        num_pages = tl.load(indptr_ptr + b + 1) - page_start
        kv_len = (num_pages - 1) * PAGE_SIZE + tl.load(last_len_ptr + b)
        per_split = tl.cdiv(num_pages, num_splits)
        first = split * per_split
        last = tl.minimum(first + per_split, num_pages)  # first >= last: an empty split

        offs_g = tl.arange(0, BLOCK_G)
        in_group = offs_g < GROUP
        heads = h * GROUP + offs_g
        offs_d = tl.arange(0, HEAD_DIM)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # (the merge waits for this whole grid anyway)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=in_group[:, None], other=0.0)
        offs_n = tl.arange(0, BLOCK_N)
        page_of_n = offs_n // PAGE_SIZE
        slot_of_n = offs_n % PAGE_SIZE
        row_ptrs = kv_ptr + h * HEAD_DIM + slot_of_n[:, None] * ROW + offs_d[None, :]  # [BLOCK_N, D], page 0

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for p in range(first, last, PAGES_PER_BLOCK):
            # Every block holds at least one valid token (its first), so each row's max stays finite.
            rel_page = p + page_of_n
            in_split = rel_page < last
            valid = in_split & (rel_page * PAGE_SIZE + slot_of_n < kv_len)
            page_ids = tl.load(page_ids_ptr + page_start + rel_page, mask=in_split, other=0).to(tl.int64)
            ptrs = row_ptrs + page_ids[:, None] * (2 * PLANE)
            k = tl.load(ptrs, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], base-2 logits
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            weights = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(weights, axis=1)
            v = tl.load(ptrs + PLANE, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
            m_i = m_new

        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        o = acc / l_safe[:, None]
        if DIRECT:
            out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
        else:
            rows = (b * num_q_heads + heads).to(tl.int64) * num_splits + split  # [B, Hq, S] row-major
            tl.store(part_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=in_group[:, None])
            lse = m_i + tl.log2(l_safe)  # an empty split: -inf + 0
            tl.store(lse_ptr + rows, lse, mask=in_group)

    @triton.jit
    def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_q_heads, num_splits, stride_ob, stride_oh,
                             HEAD_DIM: tl.constexpr, SPLIT_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (b, h): merges the splits of query head h of sequence b."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # few programs: the next kernel may start on the free SMs
        base = (b * num_q_heads + h).to(tl.int64) * num_splits
        offs_s = tl.arange(0, SPLIT_BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        m = float("-inf")
        denom = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for start in range(0, num_splits, SPLIT_BLOCK):  # online over chunks of SPLIT_BLOCK splits
            in_range = start + offs_s < num_splits
            lse = tl.load(lse_ptr + base + start + offs_s, mask=in_range, other=float("-inf"))
            parts = tl.load(part_ptr + (base + start + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                            mask=in_range[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, axis=0))  # finite from the first chunk on (split 0 is not empty)
            alpha = tl.exp2(m - m_new)
            weights = tl.exp2(lse - m_new)  # empty and out-of-range splits: 0
            denom = denom * alpha + tl.sum(weights, axis=0)
            acc = acc * alpha + tl.sum(weights[:, None] * parts, axis=0)
            m = m_new
        out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
        tl.store(out_ptrs, (acc / denom).to(out_ptr.dtype.element_ty))


# -- launch decisions --------------------------------------------------------------------------------------


def choose_num_splits(batch_size: int, num_kv_heads: int, max_splits: int = 64,
                      num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Splits per (sequence, KV head) so that kernel 1 has about two programs per SM: each program streams its
    share of K/V with a handful of loads in flight, and two per SM let one's loads overlap the other's math.
    The context length is not an input (it lives on the device, and one graph replays for every length), so
    short contexts get empty splits: those cost one neutral write and one masked read in the merge. Capped at
    max_splits: each split adds Hq * D * 4 bytes of partials per sequence and work to the merge.
    Llama-3.1-8B (Hkv 8) on 132 SMs: 33 splits at batch 1, 5 at batch 8, 1 from batch 33 on."""
    if min(batch_size, num_kv_heads, max_splits, num_sms) < 1:
        raise ValueError(f"every argument must be positive, got batch_size={batch_size}, "
                         f"num_kv_heads={num_kv_heads}, max_splits={max_splits}, num_sms={num_sms}")
    programs_per_split = batch_size * num_kv_heads
    return max(1, min(max_splits, -(-2 * num_sms // programs_per_split)))


def _block_tokens(head_dim: int, page_size: int) -> int:
    """Tokens of K (and of V) per step: 64 (a [64, 128] bf16 tile is 16 KB), fewer for D > 128, whole pages."""
    target = 64 if head_dim <= 128 else 32
    return max(1, target // page_size) * page_size


# -- validation ----------------------------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_cache(kv_cache: torch.Tensor, dtype: torch.dtype, head_dim: int, name: str) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [num_pages, 2, page_size, Hkv, D], got {tuple(kv_cache.shape)}")
    if kv_cache.dtype != dtype:
        raise ValueError(f"kv_cache is {kv_cache.dtype} but {name} is {dtype}")
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"head_dim mismatch: {name} has {head_dim}, kv_cache has {kv_cache.shape[4]}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if not _is_pow2(kv_cache.shape[2]):
        raise ValueError(f"page_size must be a power of two, got {kv_cache.shape[2]}")


def _check_heads(x: torch.Tensor, name: str, num_rows: int, num_heads: int | None, head_dim: int) -> None:
    """x is [num_rows, num_heads (any if None), head_dim] with a contiguous last dimension."""
    if x.dim() != 3 or x.shape[0] != num_rows or x.shape[2] != head_dim or \
            (num_heads is not None and x.shape[1] != num_heads):
        want = f"[{num_rows}, {'H' if num_heads is None else num_heads}, {head_dim}]"
        raise ValueError(f"{name} must be {want}, got {tuple(x.shape)}")
    if x.stride(2) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous")


def _check_vector(x: torch.Tensor, name: str, length: int | None, dtypes: tuple[torch.dtype, ...],
                  device: torch.device) -> None:
    """x is 1-D, contiguous, of one of dtypes, `length` long (at least `-length` if negative) on device."""
    ok_length = length is None or (x.numel() == length if length >= 0 else x.numel() >= -length)
    if x.dim() != 1 or not ok_length or x.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous 1-D tensor of length "
                         f"{'>= ' + str(-length) if length < 0 else length}, got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the rest on {device}")


def _check_device_and_triton(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"{what} runs on CUDA tensors, got {device}")
    if triton is None:
        raise RuntimeError(f"{what} needs Triton, which is not installed")


def _check_q(q: torch.Tensor, name: str) -> None:
    if q.dim() != 3:
        raise ValueError(f"{name} must be [rows, heads, head_dim], got {tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if not _is_pow2(q.shape[2]) or q.shape[2] < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {q.shape[2]}")
    if q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"{name} must have rows and heads, got {tuple(q.shape)}")


# -- entry points ----------------------------------------------------------------------------------------------


def rope_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, write_index: torch.Tensor,
                source_rows: torch.Tensor | None = None) -> None:
    """Rotates q [T, Hq, D] in place and writes rotated k / plain v [T, Hkv, D] of row source_rows[t] (or t)
    to page write_index[t], offset write_index[T + t] of kv_cache (k is not modified). One launch."""
    _check_q(q, "q")
    num_tokens, num_q_heads, head_dim = q.shape
    _check_cache(kv_cache, q.dtype, head_dim, "q")
    num_kv_heads = kv_cache.shape[3]
    for name, x in (("k", k), ("v", v)):
        _check_heads(x, name, num_tokens, num_kv_heads, head_dim)
        if x.dtype != q.dtype:
            raise ValueError(f"{name} is {x.dtype} but q is {q.dtype}")
    _check_heads(q, "q", num_tokens, None, head_dim)
    ints = (torch.int32, torch.int64)
    _check_vector(positions, "positions", num_tokens, ints, q.device)
    _check_vector(write_index, "write_index", 2 * num_tokens, ints, q.device)
    if source_rows is not None:
        _check_vector(source_rows, "source_rows", num_tokens, ints, q.device)
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(1) != 1 or \
            cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32 [max_positions, {head_dim}] with contiguous rows, got "
                         f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    for name, x in (("k", k), ("v", v), ("cos_sin_cache", cos_sin_cache), ("kv_cache", kv_cache)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q on {q.device}")
    _check_device_and_triton(q.device, "rope_append")
    _rope_append_kernel[(num_tokens, num_q_heads + num_kv_heads)](
        q, k, v, positions, cos_sin_cache, kv_cache, write_index,
        write_index if source_rows is None else source_rows, num_tokens, num_q_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        HEAD_DIM=head_dim, NUM_KV_HEADS=num_kv_heads, PAGE_SIZE=kv_cache.shape[2],
        HAS_SOURCE=source_rows is not None, num_warps=1)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, kv_page_indptr: torch.Tensor,
                     kv_page_ids: torch.Tensor, kv_last_page_lens: torch.Tensor, num_splits: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D] -> [B, Hq, D] in q's dtype (into `out` if given): softmax
    attention (scale 1/sqrt(D), GQA) over each sequence's cached tokens, the new one included."""
    _check_q(q, "q")
    batch, num_q_heads, head_dim = q.shape
    _check_heads(q, "q", batch, None, head_dim)
    _check_cache(kv_cache, q.dtype, head_dim, "q")
    page_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q's {num_q_heads} heads are not a multiple of the cache's {num_kv_heads} KV heads")
    if kv_cache.device != q.device:
        raise ValueError(f"kv_cache is on {kv_cache.device} but q on {q.device}")
    _check_vector(kv_page_indptr, "kv_page_indptr", batch + 1, (torch.int32,), q.device)
    _check_vector(kv_page_ids, "kv_page_ids", -batch, (torch.int32,), q.device)
    _check_vector(kv_last_page_lens, "kv_last_page_lens", batch, (torch.int32,), q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if out is None:
        out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    else:
        _check_heads(out, "out", batch, num_q_heads, head_dim)
        if out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {q.dtype} on {q.device}, got {out.dtype} on {out.device}")
    _check_device_and_triton(q.device, "decode_attention")

    group = num_q_heads // num_kv_heads
    direct = num_splits == 1
    if direct:  # kernel 1 writes out; the partial pointers are unused
        partials = lse = out
    else:
        partials = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    split_block = min(triton.next_power_of_2(num_splits), _MAX_MERGE_CHUNK)
    pdl = uses_pdl(q.device)  # (kernels/launch.py)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, kv_page_indptr, kv_page_ids, kv_last_page_lens, out, partials, lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        num_q_heads, num_splits, _LOG2E / math.sqrt(head_dim), HEAD_DIM=head_dim, NUM_KV_HEADS=num_kv_heads,
        GROUP=group, BLOCK_G=max(_MIN_DOT_ROWS, triton.next_power_of_2(group)), PAGE_SIZE=page_size,
        PAGES_PER_BLOCK=_block_tokens(head_dim, page_size) // page_size, DIRECT=direct, USE_PDL=pdl,
        launch_pdl=pdl, num_warps=4, num_stages=2)
    if not direct:
        _merge_splits_kernel[(batch, num_q_heads)](
            partials, lse, out, num_q_heads, num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            SPLIT_BLOCK=split_block, USE_PDL=pdl, launch_pdl=pdl, num_warps=4)
    return out

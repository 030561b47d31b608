"""The Triton kernels behind kernels/gemv.py (launch configs, validation and the entry point live there).

Defined only when Triton imports; with TRITON_INTERPRET=1 set before import they run on CPU tensors.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only installs: kernels/gemv.py reports gemv as unavailable
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_per_split,
                     NUM_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, DEFERRED: tl.constexpr):
        """Program (pid_n, pid_k): out[pid_k, m, rows] = x[m, ks] @ W[rows, ks].T (+ bias) for m < NUM_M over its
        K range ks. out is y itself (stride_os = 0, one split) or the fp32 partials [num_splits, M, N].
        One accumulator per input row (acc0..acc7; NUM_M <= 8 is a compile-time constant, unused ones vanish)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # clamped for loads; rows past N are never stored
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_k * k_per_split  # this program's K range: [k_start, min(k_start + k_per_split, K))
        w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
        x_ptrs = x_ptr + k_start + offs_k
        if DEFERRED:
            acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc0, acc0, acc0, acc0, acc0, acc0, acc0
        for k in range(0, k_per_split, BLOCK_K):
            in_k = k_start + k + offs_k < K  # unused (and removed) when EVEN_K
            if EVEN_K:
                w = tl.load(w_ptrs).to(tl.float32)
            else:
                w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0).to(tl.float32)
            acc0 = _row_step(acc0, w, x_ptrs, in_k, EVEN_K, DEFERRED)
            if NUM_M > 1:
                acc1 = _row_step(acc1, w, x_ptrs + stride_xm, in_k, EVEN_K, DEFERRED)
            if NUM_M > 2:
                acc2 = _row_step(acc2, w, x_ptrs + 2 * stride_xm, in_k, EVEN_K, DEFERRED)
            if NUM_M > 3:
                acc3 = _row_step(acc3, w, x_ptrs + 3 * stride_xm, in_k, EVEN_K, DEFERRED)
            if NUM_M > 4:
                acc4 = _row_step(acc4, w, x_ptrs + 4 * stride_xm, in_k, EVEN_K, DEFERRED)
            if NUM_M > 5:
                acc5 = _row_step(acc5, w, x_ptrs + 5 * stride_xm, in_k, EVEN_K, DEFERRED)
            if NUM_M > 6:
                acc6 = _row_step(acc6, w, x_ptrs + 6 * stride_xm, in_k, EVEN_K, DEFERRED)
            if NUM_M > 7:
                acc7 = _row_step(acc7, w, x_ptrs + 7 * stride_xm, in_k, EVEN_K, DEFERRED)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            bias = tl.load(b_ptr + rows_n).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        out_ptrs = out_ptr + pid_k * stride_os + offs_n
        in_n = offs_n < N
        _store_row(out_ptrs, acc0, bias, in_n, DEFERRED)
        if NUM_M > 1:
            _store_row(out_ptrs + stride_om, acc1, bias, in_n, DEFERRED)
        if NUM_M > 2:
            _store_row(out_ptrs + 2 * stride_om, acc2, bias, in_n, DEFERRED)
        if NUM_M > 3:
            _store_row(out_ptrs + 3 * stride_om, acc3, bias, in_n, DEFERRED)
        if NUM_M > 4:
            _store_row(out_ptrs + 4 * stride_om, acc4, bias, in_n, DEFERRED)
        if NUM_M > 5:
            _store_row(out_ptrs + 5 * stride_om, acc5, bias, in_n, DEFERRED)
        if NUM_M > 6:
            _store_row(out_ptrs + 6 * stride_om, acc6, bias, in_n, DEFERRED)
        if NUM_M > 7:
            _store_row(out_ptrs + 7 * stride_om, acc7, bias, in_n, DEFERRED)

    @triton.jit
    def _row_step(acc, w, x_ptrs, in_k, EVEN_K: tl.constexpr, DEFERRED: tl.constexpr):
        """One input row's update by the fp32 weight tile w [BLOCK_N, BLOCK_K]: acc [BLOCK_N, BLOCK_K] gathers
        products (DEFERRED, reduced once at the end) or acc [BLOCK_N] gathers each step's row sums."""
        if EVEN_K:
            xk = tl.load(x_ptrs)
        else:
            xk = tl.load(x_ptrs, mask=in_k, other=0.0)
        prod = w * xk.to(tl.float32)[None, :]
        if DEFERRED:
            acc = acc + prod
        else:
            acc = acc + tl.sum(prod, axis=1)
        return acc

    @triton.jit
    def _store_row(out_ptrs, acc, bias, in_n, DEFERRED: tl.constexpr):
        if DEFERRED:
            row = tl.sum(acc, axis=1)
        else:
            row = acc
        tl.store(out_ptrs, (row + bias).to(out_ptrs.dtype.element_ty), mask=in_n)

    @triton.jit
    def _gemv_dot_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os,
                         k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr):
        """The same contract as _gemv_kernel through tl.dot: the inputs padded to BLOCK_M (16) rows by repeating
        row M - 1 (those rows are never stored) times each [BLOCK_N, BLOCK_K] weight tile, fp32 accumulator."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)
        rows_m = tl.minimum(tl.arange(0, BLOCK_M), M - 1)
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_k * k_per_split
        w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
        if SWAP_AB:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                xk = tl.load(x_ptrs)
            else:
                in_k = (k_start + k + offs_k < K)[None, :]
                w = tl.load(w_ptrs, mask=in_k, other=0.0)
                xk = tl.load(x_ptrs, mask=in_k, other=0.0)
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(xk), acc)
            else:
                acc = tl.dot(xk, tl.trans(w), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if SWAP_AB:
            acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
        offs_m = tl.arange(0, BLOCK_M)
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _split_k_reduce_kernel(part_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                               HAS_BIAS: tl.constexpr):
        """y.flat[i] = sum over s of partials[s].flat[i] (+ bias[i % N]), summed in split order."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * MN + offs, mask=in_bounds, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=in_bounds, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=in_bounds)

    @triton.jit
    def _gemv_fused_kernel(x_ptr, w_ptr, b_ptr, nw_ptr, res_ptr, out_ptr, N, K, stride_wn, up_offset, bias_up_offset,
                           eps, pos_ptr, cs_ptr, kv_ptr, widx_ptr, num_q_heads, num_kv_heads, stride_kv_page,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           NORM: tl.constexpr, GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr, ROPE: tl.constexpr,
                           HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_PDL: tl.constexpr):
        """One input row x [K], N output columns per program block, the whole K range in one program.
        NORM: the input is rms_norm(x) * nw: x * nw enters the products and the row's 1/rms (its sum of squares
        gathered in the same loop) scales the sums at the end. GATED: the weight is [gate (N rows); up (N rows)]
        (up rows start up_offset elements later) and the output is silu(gate) * up, each rounded to the output
        dtype first as the unfused kernels do. ROPE: the qkv projection of one token; a program takes BLOCK_N
        rotary pairs (rows r and r + D/2) of one head: q heads are rotated into out, k heads rotated and v heads
        as they are written to the token's KV-cache slot (see _rope_kv_store). ADD_RESIDUAL: res[n] += y[n]
        (y rounded first), nothing else is written; else out[n] = y[n]."""
        pid_n = tl.program_id(0)
        if ROPE:
            pairs_per_head: tl.constexpr = HEAD_DIM // 2 // BLOCK_N
            head = pid_n // pairs_per_head
            first_pair = (pid_n % pairs_per_head) * BLOCK_N
            offs_n = head * HEAD_DIM + first_pair + tl.arange(0, BLOCK_N)
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # clamped for loads; rows past N are never stored
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = acc
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        if USE_PDL:  # launched while the previous kernel drains: wait for its x, residual and KV writes
            tl.extra.cuda.gdc_wait()
        for k in range(0, K, BLOCK_K):
            in_k = k + offs_k < K  # unused (and removed) when EVEN_K
            if EVEN_K:
                xk = tl.load(x_ptr + k + offs_k).to(tl.float32)
                w = tl.load(w_ptrs).to(tl.float32)
            else:
                xk = tl.load(x_ptr + k + offs_k, mask=in_k, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=in_k[None, :], other=0.0).to(tl.float32)
            if NORM:
                sum_sq += xk * xk
                if EVEN_K:
                    xk = xk * tl.load(nw_ptr + k + offs_k).to(tl.float32)
                else:
                    xk = xk * tl.load(nw_ptr + k + offs_k, mask=in_k, other=0.0).to(tl.float32)
            acc += w * xk[None, :]
            if GATED or ROPE:
                if EVEN_K:
                    w_up = tl.load(w_ptrs + up_offset).to(tl.float32)
                else:
                    w_up = tl.load(w_ptrs + up_offset, mask=in_k[None, :], other=0.0).to(tl.float32)
                acc_up += w_up * xk[None, :]
            w_ptrs += BLOCK_K
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch on the SMs this one frees
        rstd = 1.0
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / K + eps)
        y = tl.sum(acc, axis=1) * rstd
        if HAS_BIAS:
            y += tl.load(b_ptr + rows_n).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        in_n = offs_n < N
        if GATED or ROPE:
            up = tl.sum(acc_up, axis=1) * rstd
            if HAS_BIAS:
                up += tl.load(b_ptr + bias_up_offset + rows_n).to(tl.float32)
            first = y.to(dtype).to(tl.float32)  # (the unfused projection's rounding)
            second = up.to(dtype).to(tl.float32)
            if GATED:
                y = first / (1.0 + tl.exp(-first)) * second
            else:
                _rope_kv_store(first, second, offs_n, head, first_pair, pos_ptr, cs_ptr, out_ptr, kv_ptr, widx_ptr,
                               num_q_heads, num_kv_heads, stride_kv_page, BLOCK_N, HEAD_DIM, PAGE_SIZE)
        if ADD_RESIDUAL:
            residual = tl.load(res_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
            tl.store(res_ptr + offs_n, (y.to(dtype).to(tl.float32) + residual).to(dtype), mask=in_n)
        elif not ROPE:
            tl.store(out_ptr + offs_n, y.to(dtype), mask=in_n)

    @triton.jit
    def _rope_kv_store(lo, hi, offs_n, head, first_pair, pos_ptr, cs_ptr, out_ptr, kv_ptr, widx_ptr, num_q_heads,
                       num_kv_heads, stride_kv_page, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       PAGE_SIZE: tl.constexpr):
        """lo, hi [BLOCK_N]: rows offs_n and offs_n + D/2 of `head` (q heads, then k heads, then v heads) of the
        token's projection. q and k are rotated (NeoX: pair i is (x_i, x_{i + D/2}), angle of column i of the
        [positions, D] cos | sin cache at the token's position); q goes to out, k and v to the KV cache
        [P, 2, PAGE_SIZE, Hkv, D] at page widx[0], offset widx[1]."""
        HALF: tl.constexpr = HEAD_DIM // 2
        dtype = out_ptr.dtype.element_ty
        if head < num_q_heads + num_kv_heads:
            position = tl.load(pos_ptr).to(tl.int64)
            cols = first_pair + tl.arange(0, BLOCK_N)
            cos = tl.load(cs_ptr + position * HEAD_DIM + cols)
            sin = tl.load(cs_ptr + position * HEAD_DIM + HALF + cols)
            lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
        if head < num_q_heads:
            tl.store(out_ptr + offs_n, lo.to(dtype))
            tl.store(out_ptr + offs_n + HALF, hi.to(dtype))
        else:
            kv_head = head - num_q_heads
            is_v = (kv_head >= num_kv_heads).to(tl.int64)
            kv_head = kv_head - is_v * num_kv_heads
            page = tl.load(widx_ptr)
            slot = tl.load(widx_ptr + 1)
            row = num_kv_heads * HEAD_DIM
            dst = kv_ptr + page * stride_kv_page + is_v * (PAGE_SIZE * row) + slot * row + kv_head * HEAD_DIM \
                + first_pair + tl.arange(0, BLOCK_N)
            tl.store(dst, lo.to(kv_ptr.dtype.element_ty))
            tl.store(dst + HALF, hi.to(kv_ptr.dtype.element_ty))

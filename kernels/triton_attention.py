"""Decode attention for CUDA graphs up to 64 sequences (MAX_BATCH_SIZE): Triton kernels (kernels/decode_triton.py)
behind kernels/attention.py's AttentionBackend.

Why: at batch 1, FlashInfer's decode kernel spends ~19 us per Llama-3.1-8B layer on a 1024-token context
(4 MB of K/V: ~2 us at the H100's bandwidth) and RoPE + the KV append take three more kernels. Here one
kernel rotates q and k and writes K/V (rope_and_forward), and a split-KV kernel spreads each sequence's
pages over enough programs to fill the GPU, then a second kernel merges the splits (a merge inside the split
kernel measured slower: kernels/decode_triton.py). At batch 1 the model writes K/V itself in the qkv
projection (kv_write_index). At 16-64 sequences its graphs ran faster than FlashInfer's, and its plan is two
host-to-device copies where FlashInfer's decode plan also computes its work split on the host (MAX_BATCH_SIZE).

Decode steps only, a fixed batch size (the graph's bucket): plan() writes the step's metadata into static
device buffers in place (two asynchronous copies from pinned memory), so a graph captured around forward()
stays valid. Padding rows (copies of row 0, see engine/executor/cuda_graphs.py) write row 0's K/V into row
0's slot through source_rows, as in FlashInferAttention's graph mode.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from pie_server.kernels import decode_triton
from pie_server.kernels.attention import AttentionBackend, AttentionStep, RopeFn
from pie_server.kernels.flashinfer_attention import AttentionShape, build_host_metadata
from pie_server.kernels.kv_append import append_kv
from pie_server.kernels.transfer import pinned

# Buckets up to this size use these kernels; larger ones go to FlashInfer. H100, 2026-12-05,
# bench/gpu_host_breakdown.py (context 512, pipelined, same machine, PIE_TRITON_DECODE_MAX_BATCH 8 against 256):
# at batches 16 and 64 the graph's GPU time fell 1.169 -> 1.075 and 1.569 -> 1.393 ms for SmolLM2 and
# 6.654 -> 6.578 and 8.449 -> 8.081 ms for Llama-3.1-8B, and the host's plan 0.34-0.54 -> 0.17 ms (FlashInfer
# plans its split on the host). Buckets of 128 and 256 stay with FlashInfer: not measured.
MAX_BATCH_SIZE = 64


def is_available() -> bool:
    return decode_triton.triton is not None and torch.cuda.is_available()


def max_batch_size() -> int:
    """The largest graph bucket these kernels serve: MAX_BATCH_SIZE, or PIE_TRITON_DECODE_MAX_BATCH (for A/B
    benchmarks, e.g. bench/gpu_host_breakdown.py; 0: FlashInfer for every bucket)."""
    return int(os.environ.get("PIE_TRITON_DECODE_MAX_BATCH", MAX_BATCH_SIZE))


class TritonDecodeAttention(AttentionBackend):
    """Decode steps of exactly `batch_size` sequences over at most `max_pages` pages in all."""

    supports_cuda_graphs = True
    pads_decode_steps = True

    def __init__(self, device: torch.device | str, shape: AttentionShape, batch_size: int, max_pages: int,
                 num_sms: int | None = None) -> None:
        if batch_size < 1 or max_pages < batch_size:
            raise ValueError("batch_size must be >= 1 and max_pages >= batch_size")
        self.device = torch.device(device)
        self.shape, self.batch_size, self.max_pages = shape, batch_size, max_pages
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
                if self.device.type == "cuda" else 132
        self.num_splits = decode_triton.choose_num_splits(batch_size, shape.num_kv_heads, num_sms=num_sms)
        # int32: kv_page_indptr [B+1], kv_last_page_lens [B], kv_page_ids [max_pages];
        # int64: write_index [2B] (pages, offsets), source_rows [B].
        self._int32 = torch.zeros(2 * batch_size + 1 + max_pages, dtype=torch.int32, device=self.device)
        self._int64 = torch.zeros(3 * batch_size, dtype=torch.long, device=self.device)
        self._indptr = self._int32[:batch_size + 1]
        self._last_lens = self._int32[batch_size + 1:2 * batch_size + 1]
        self._page_ids = self._int32[2 * batch_size + 1:]
        self._write_index, self._source_rows = self._int64[:2 * batch_size], self._int64[2 * batch_size:]
        # Host staging for the validated way (_plan_validated): the same layouts, rewritten each step.
        self._host32 = np.zeros(len(self._int32), np.int32)
        self._host64 = np.zeros(len(self._int64), np.int64)
        self._pad_ramp = np.arange(1, batch_size + 1)
        self._planned = False

    def plan(self, step: AttentionStep) -> None:
        """A validated decode step (AttentionStep.validated) of up to batch_size sequences is padded here (see
        pads_decode_steps) and not checked again; any other step must have exactly batch_size sequences."""
        if step.validated and step.num_tokens == step.num_seqs <= self.batch_size and step.custom_masks is None:
            self._plan_validated(step)
            return
        meta = build_host_metadata(step)
        if not meta.is_decode or step.num_seqs != self.batch_size:
            raise ValueError(f"this backend runs decode steps of exactly {self.batch_size} sequences")
        num_pages = len(meta.kv_page_ids)
        if num_pages > self.max_pages:
            raise ValueError(f"the step uses {num_pages} pages, more than this backend's {self.max_pages}")
        host32 = np.concatenate([meta.kv_page_indptr, meta.kv_last_page_lens, meta.kv_page_ids]).astype(np.int32)
        host64 = np.concatenate([meta.write_index, meta.source_rows]).astype(np.int64)
        # In place: a captured graph reads these very buffers. Page ids past this step's are never read.
        self._int32[:len(host32)].copy_(pinned(host32, self.device), non_blocking=True)
        self._int64.copy_(pinned(host64, self.device), non_blocking=True)
        self._planned = True

    def _plan_validated(self, step: AttentionStep) -> None:
        """plan() for a validated decode step of B <= S = batch_size sequences: the same buffers as plan() of
        cuda_graphs' padded step, written in place into this backend's host arrays (no concatenations, no checks)."""
        num_seqs, size, page_size = step.num_seqs, self.batch_size, step.page_size
        page_indptr, page_ids = step.kv_page_indptr, step.kv_page_ids
        slots, source_rows = step.slot_ids, step.source_rows
        assert isinstance(page_ids, np.ndarray) and isinstance(slots, np.ndarray) and source_rows is not None
        num_pages = int(page_indptr[-1])
        num_padded_pages = num_pages + size - num_seqs  # a padding row attends to one slot of row 0's last page
        if num_padded_pages > self.max_pages:
            raise ValueError(f"the step uses {num_padded_pages} pages, more than this backend's {self.max_pages}")
        host32, host64 = self._host32, self._host64
        host32[:num_seqs + 1] = page_indptr
        host32[num_seqs + 1:size + 1] = self._pad_ramp[:size - num_seqs] + num_pages
        host32[size + 1:size + 1 + num_seqs] = step.kv_last_page_lens
        host32[size + 1 + num_seqs:2 * size + 1] = 1
        pages = host32[2 * size + 1:2 * size + 1 + num_padded_pages]
        pages[:num_pages] = page_ids
        pages[num_pages:] = page_ids[page_indptr[1] - 1]
        write_pages, write_offsets, rows = host64[:size], host64[size:2 * size], host64[2 * size:]
        np.floor_divide(slots, page_size, out=write_pages[:num_seqs])
        np.remainder(slots, page_size, out=write_offsets[:num_seqs])
        write_pages[num_seqs:], write_offsets[num_seqs:] = write_pages[0], write_offsets[0]
        rows[:num_seqs] = source_rows
        rows[num_seqs:] = source_rows[0]  # the padding rows write row 0's K/V into its slot after it
        self._int32[:2 * size + 1 + num_padded_pages].copy_(
            pinned(host32[:2 * size + 1 + num_padded_pages], self.device), non_blocking=True)
        self._int64.copy_(pinned(host64, self.device), non_blocking=True)
        self._planned = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        self._check_planned(q)
        append_kv(kv_cache, k, v, self._write_index, self._source_rows)
        return self._attend(q, kv_cache)

    def rope_and_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, apply_rope: RopeFn) -> torch.Tensor:
        """One kernel rotates q in place and writes the rotated K and V; apply_rope is not needed."""
        self._check_planned(q)
        decode_triton.rope_append(q, k, v, positions, cos_sin_cache, kv_cache, self._write_index, self._source_rows)
        return self._attend(q, kv_cache)

    def kv_write_index(self) -> torch.Tensor | None:
        """At batch 1 (no padding rows) the model may write the token's K/V itself (in the qkv projection)."""
        return self._write_index if self.batch_size == 1 and self._planned else None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_planned(q)
        return self._attend(q, kv_cache, out)

    def _check_planned(self, q: torch.Tensor) -> None:
        if not self._planned:
            raise RuntimeError("plan() must run before forward()")
        if q.shape[0] != self.batch_size:
            raise ValueError(f"q has {q.shape[0]} rows, this backend's steps have {self.batch_size}")

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_triton.decode_attention(q, kv_cache, self._indptr, self._page_ids, self._last_lens,
                                              self.num_splits, out)

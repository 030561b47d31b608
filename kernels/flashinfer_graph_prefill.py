"""FlashInfer's paged prefill kernel inside a CUDA graph: one whole step of prefill tokens in one replay.

The piecewise graphs (engine/executor/piecewise_graphs.py) run the attention kernel eagerly between the pieces,
because a step's shape (sequences, pages) changes from step to step. FlashInfer's prefill wrapper also has a
CUDA-graph mode: a fixed number of sequences and, from the first plan on, at most that plan's number of rows;
plan() rewrites static index buffers in place and sizes the grid for the worst case, so a graph captured around
run() replays for any step within those bounds. This module pads a step to them:

- rows: a bucket of N rows; the step's T <= N tokens are the first T, and rows T..N-1 (the piecewise runner's
  padding) form one more sequence over page 0, repeated so that its context holds at least its rows (causal,
  every row sees a slot; what it reads is never used: padding rows' outputs are never read);
- sequences: a fixed count S; after the real ones (and the padding rows' one), sequences of no rows over one slot
  of page 0 (FlashInfer gives a sequence of no rows no work).

Page 0 is only read by padding, never written (the piecewise runner's padding rows write row 0's K/V into row 0's
slot). Custom masks are not taken (they would need static mask buffers): such steps stay piecewise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pie_server.kernels.attention import AttentionStep
from pie_server.kernels.flashinfer_attention import AttentionShape, HostMetadata, build_host_metadata
from pie_server.kernels.transfer import pinned, to_device

try:  # FlashInfer exists only on the GPU machine; padded_layout below also serves CPU tests.
    import flashinfer
except ImportError:  # pragma: no cover - depends on the environment
    flashinfer = None

PADDING_PAGE = 0


@dataclass(frozen=True)
class PaddedLayout:
    """A step's sequences padded to S sequences over N rows (FlashInfer's index arrays, int32)."""

    qo_indptr: np.ndarray  # [S+1], last entry N
    kv_page_indptr: np.ndarray  # [S+1]
    kv_page_ids: np.ndarray  # [kv_page_indptr[-1]]
    kv_last_page_lens: np.ndarray  # [S]


def padded_layout(meta: HostMetadata | None, num_rows: int, num_seqs: int, page_size: int) -> PaddedLayout:
    """meta's sequences, then one over its padding rows (if any), then empty ones up to num_seqs; None: a
    step of padding only (the capture's). Raises ValueError when meta does not fit (see fits())."""
    qo = meta.qo_indptr if meta is not None else np.zeros(1, np.int32)
    kv_indptr = meta.kv_page_indptr if meta is not None else np.zeros(1, np.int32)
    page_ids = meta.kv_page_ids if meta is not None else np.zeros(0, np.int32)
    last_lens = meta.kv_last_page_lens if meta is not None else np.zeros(0, np.int32)
    num_real, num_tokens = len(qo) - 1, int(qo[-1])
    num_padding_rows = num_rows - num_tokens
    num_empty = num_seqs - num_real - (1 if num_padding_rows else 0)
    if num_padding_rows < 0 or num_empty < 0:
        raise ValueError(f"{num_real} sequences of {num_tokens} tokens do not fit {num_seqs} sequences of "
                         f"{num_rows} rows")
    # The padding rows' sequence: page 0 repeated, full pages, at least one slot per row.
    padding_pages = -(-num_padding_rows // page_size) if num_padding_rows else 0
    q_lens = np.concatenate([np.diff(qo), [num_padding_rows] * (1 if num_padding_rows else 0), np.zeros(num_empty)])
    page_counts = np.concatenate([np.diff(kv_indptr), [padding_pages] * (1 if num_padding_rows else 0),
                                  np.ones(num_empty)])
    lens = np.concatenate([last_lens, [page_size] * (1 if num_padding_rows else 0), np.ones(num_empty)])
    ids = np.concatenate([page_ids, np.full(padding_pages + num_empty, PADDING_PAGE)])
    return PaddedLayout(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
                        np.concatenate([[0], np.cumsum(page_counts)]).astype(np.int32),
                        ids.astype(np.int32), lens.astype(np.int32))


class GraphPrefillAttention:
    """One bucket's attention for whole-step graphs: N rows, S sequences, at most max_pages page ids. plan()
    before each replay (and once before capture, with None); attend() once per layer, captured."""

    def __init__(self, shape: AttentionShape, workspace: torch.Tensor, page_size: int, num_rows: int, num_seqs: int,
                 page_id_buffer: torch.Tensor, device: torch.device) -> None:
        """page_id_buffer: int32 on the device, the most page ids a step may use; buckets may share it (and the
        workspace), as only one step runs at a time."""
        if flashinfer is None:
            raise ImportError("FlashInfer is not installed (pip install flashinfer-python)")
        max_pages = page_id_buffer.numel()
        if num_rows < 1 or num_seqs < 2 or max_pages < num_seqs + num_rows or page_id_buffer.dtype != torch.int32:
            raise ValueError("need num_rows >= 1, num_seqs >= 2 and an int32 page-id buffer with room for padding")
        self.shape, self.page_size, self.num_rows, self.num_seqs = shape, page_size, num_rows, num_seqs
        self.max_pages = max_pages
        self.device = device
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, backend="fa2",
            qo_indptr_buf=torch.zeros(num_seqs + 1, dtype=torch.int32, device=device),
            paged_kv_indptr_buf=torch.zeros(num_seqs + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buf=page_id_buffer,
            paged_kv_last_page_len_buf=torch.ones(num_seqs, dtype=torch.int32, device=device))
        # FlashInfer stages each plan in a pinned host buffer copied to the device asynchronously: the next plan
        # must wait for that copy (recorded here after each plan).
        self._plan_copied: torch.cuda.Event | None = None

    def fits(self, step: AttentionStep) -> bool:
        """Whether step can replay through this bucket's graph (else: the piecewise path)."""
        num_tokens, num_seqs = step.num_tokens, step.num_seqs
        num_padding = self.num_rows - num_tokens
        return not step.has_custom_mask and step.page_size == self.page_size and num_padding >= 0 and \
            num_seqs + (1 if num_padding else 0) <= self.num_seqs and \
            step.kv_page_indptr[-1] + self.num_seqs + num_padding <= self.max_pages

    def plan(self, step: AttentionStep | None) -> None:
        """Rewrites the graph's index buffers for step (None: padding only, for the capture)."""
        meta = build_host_metadata(step) if step is not None else None
        layout = padded_layout(meta, self.num_rows, self.num_seqs, self.page_size)
        shape = self.shape
        if self._plan_copied is None:
            self._plan_copied = torch.cuda.Event()
        else:
            self._plan_copied.synchronize()
        self._wrapper.plan(pinned(layout.qo_indptr, self.device), pinned(layout.kv_page_indptr, self.device),
                           to_device(layout.kv_page_ids, self.device), pinned(layout.kv_last_page_lens, self.device),
                           shape.num_qo_heads, shape.num_kv_heads, shape.head_dim,
                           self.page_size, causal=True,
                           q_data_type=shape.dtype, kv_data_type=shape.dtype)
        self._plan_copied.record()

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """q, out: [N, Hq, D] (all rows, padding included)."""
        return self._wrapper.run(q, kv_cache, out=out)

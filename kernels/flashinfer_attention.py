"""Paged attention on NVIDIA GPUs through FlashInfer, behind kernels/attention.py's AttentionBackend.

plan(step) runs once per step on the host: it builds the int32 page tables, the KV write indices and (when
a sequence brings its own) the attention mask, then plans FlashInfer's decode wrapper when every sequence
adds one causal token (AttentionStep.is_decode) and the paged prefill wrapper otherwise. forward() runs
once per layer: it scatters the new K/V into the layer's cache, then attends; it never synchronises.

Cache layout (FlashInfer "NHD", combined K/V): kv_cache[layer] is [num_pages, 2, page_size, Hkv, D].

CUDA-graph mode (graph_batch_size set): decode only, a fixed batch size, every device-side input in a
static buffer that plan() overwrites in place, so a graph captured around forward() stays valid. A graph's
batch is padded with copies of row 0 (same slot, same page): rows that write one slot all write the K/V of
the first of them, so the result does not depend on the order of the writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from pie_server.kernels import decode_triton
from pie_server.kernels.attention import AttentionBackend, AttentionStep, RopeFn
from pie_server.kernels.kv_append import append_kv
from pie_server.kernels.transfer import pinned, to_device

# FlashInfer's CUDA norm kernels (one nvcc-compiled module, cacheable) rather than its CuTe-DSL ones.
os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")
try:  # FlashInfer exists only on the GPU machine; the helpers below also serve CPU tests.
    import flashinfer
except ImportError:  # pragma: no cover - depends on the environment
    flashinfer = None

# Float workspace (split-k partial results). The tensor-core decode of the large graph batches needs more than
# the 128 MiB FlashInfer recommends (167 MiB asked for in the 8B shape's graph capture on an H200).
WORKSPACE_BYTES = 512 << 20
_FI_DTYPES = (torch.float16, torch.bfloat16)


def is_available() -> bool:
    """FlashInfer is importable and a CUDA device is present."""
    return flashinfer is not None and torch.cuda.is_available()


@dataclass(frozen=True)
class AttentionShape:
    """What FlashInfer's plan needs besides the step: head counts, head size, element type."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if min(self.num_qo_heads, self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError("head counts and head_dim must be positive")
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError("num_qo_heads must be a multiple of num_kv_heads")
        if self.dtype not in _FI_DTYPES:
            raise ValueError(f"FlashInfer attention needs float16 or bfloat16, got {self.dtype}")


@dataclass(frozen=True)
class HostMetadata:
    """A step's page tables and write targets as host arrays (int32 for FlashInfer, int64 for indexing)."""

    page_size: int
    qo_indptr: np.ndarray  # [B+1] int32
    kv_page_indptr: np.ndarray  # [B+1] int32
    kv_page_ids: np.ndarray  # [num_pages_used] int32
    kv_last_page_lens: np.ndarray  # [B] int32
    write_index: np.ndarray  # [2T] int64: each new token's page, then each one's offset in its page
    source_rows: np.ndarray  # [T] int64: the first new token that writes the same slot (itself if unique)
    mask: np.ndarray | None  # flat bool, per sequence its [q_len, kv_len] mask row-major; None = causal

    @property
    def is_decode(self) -> bool:
        """One causal token per sequence (AttentionStep.is_decode, from the arrays)."""
        return self.mask is None and int(self.qo_indptr[-1]) == len(self.qo_indptr) - 1


def build_host_metadata(step: AttentionStep) -> HostMetadata:
    """Validates the step against itself and flattens it for FlashInfer."""
    num_seqs, page_size = step.num_seqs, step.page_size
    qo_indptr = np.asarray(step.qo_indptr, dtype=np.int32)
    kv_page_indptr = np.asarray(step.kv_page_indptr, dtype=np.int32)
    last_lens = np.asarray(step.kv_last_page_lens, dtype=np.int32)
    if num_seqs < 1 or len(kv_page_indptr) != num_seqs + 1 or len(last_lens) != num_seqs:
        raise ValueError("qo_indptr, kv_page_indptr and kv_last_page_lens disagree on the number of sequences")
    q_lens, num_pages = np.diff(qo_indptr), np.diff(kv_page_indptr)
    if (q_lens < 1).any() or (num_pages < 1).any():
        raise ValueError("every sequence needs at least one new token and one page")
    if ((last_lens < 1) | (last_lens > page_size)).any():
        raise ValueError(f"kv_last_page_lens must lie in [1, {page_size}]")
    kv_lens = (num_pages - 1) * page_size + last_lens
    if (q_lens > kv_lens).any():
        raise ValueError("a sequence has more new tokens than context slots")
    if len(step.slot_ids) != qo_indptr[-1] or len(step.kv_page_ids) != kv_page_indptr[-1]:
        raise ValueError("slot_ids must hold one slot per new token and kv_page_ids one id per page")
    slots = np.asarray(step.slot_ids, dtype=np.int64)
    mask = _flat_mask(step, q_lens, kv_lens) if step.has_custom_mask else None
    if step.source_rows is not None:
        source_rows = np.asarray(step.source_rows, dtype=np.int64)
        if len(source_rows) != len(slots):
            raise ValueError("source_rows must hold one row per new token")
    else:
        _, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
        source_rows = first[inverse].astype(np.int64)
    return HostMetadata(page_size, qo_indptr, kv_page_indptr, np.asarray(step.kv_page_ids, dtype=np.int32),
                        last_lens, np.concatenate([slots // page_size, slots % page_size]), source_rows, mask)


def _flat_mask(step: AttentionStep, q_lens: np.ndarray, kv_lens: np.ndarray) -> np.ndarray:
    """Concatenated per-sequence masks; sequences without one get the causal (bottom-right) mask."""
    parts = []
    for b, (q_len, kv_len) in enumerate(zip(q_lens.tolist(), kv_lens.tolist())):
        custom = step.custom_masks[b] if step.custom_masks is not None else None
        if custom is None:
            part = np.tri(q_len, kv_len, kv_len - q_len, dtype=bool)
        else:
            part = np.asarray(custom, dtype=bool)
            if part.shape != (q_len, kv_len):
                raise ValueError(f"attention mask of sequence {b} is {part.shape}, want {(q_len, kv_len)}")
        parts.append(part.reshape(-1))
    return np.concatenate(parts)


def decode_uses_tensor_cores(shape: AttentionShape | None, graph_mode: bool) -> bool:
    """Whether decode runs FlashInfer's tensor-core (prefill) kernels: under CUDA graphs, for 4 or more query
    heads per KV head. H200, Llama-3.1-8B shape (group 4), batch 64, pipelined TPOT: 7.80 -> 7.25 ms at context
    512, 9.23 -> 8.20 ms at 1024. Eager steps got slower with it (12.0 -> 22.1 ms: its per-step planning is
    dearer), and SmolLM2 (group 3, head_dim 64) did not gain (3.14 -> 3.23 ms). PIE_FI_DECODE_TENSOR_CORES=0/1
    forces the choice (bench/gpu_decode.py for the A/B)."""
    forced = os.environ.get("PIE_FI_DECODE_TENSOR_CORES")
    if forced is not None:
        return forced == "1"
    return graph_mode and shape is not None and shape.num_qo_heads // shape.num_kv_heads >= 4


def graph_rope_append_uses_triton() -> bool:
    """Whether CUDA-graph decode steps rotate and append K/V with one Triton kernel (decode_triton.rope_append,
    which reads each row's source row itself) instead of FlashInfer's rope kernel, a gather of the padding rows'
    K/V and the scatter: three launches a layer, ~15 us at batch 16 on the H200 (bench/gpu_profile_decode.py).
    PIE_FI_TRITON_ROPE_APPEND=0 turns it off (bench/gpu_decode.py for the A/B)."""
    return os.environ.get("PIE_FI_TRITON_ROPE_APPEND", "1") == "1"


class FlashInferAttention(AttentionBackend):
    """FlashInfer paged attention. Give `shape` to plan FlashInfer inside plan(); without it the first
    forward() of a step plans from q/k's shapes (still once per step)."""

    supports_cuda_graphs = True

    def __init__(self, device: torch.device | str = "cuda", shape: AttentionShape | None = None, *,
                 workspace: torch.Tensor | None = None, graph_batch_size: int | None = None,
                 page_id_buffer: torch.Tensor | None = None) -> None:
        if flashinfer is None:
            raise ImportError("FlashInfer is not installed (pip install flashinfer-python)")
        self.device = torch.device(device)
        self.shape = shape
        self.graph_batch_size = graph_batch_size
        if workspace is None:
            workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.workspace = workspace
        self._step: HostMetadata | None = None
        self._planned_for: AttentionShape | None = None
        self._is_decode = False
        self._mask: torch.Tensor | None = None
        # Recorded after each plan's copies: FlashInfer stages its plan in a pinned host buffer that it copies
        # to the device asynchronously; the next plan must not overwrite it before that copy has run.
        self._plan_copied: torch.cuda.Event | None = None
        if graph_batch_size is None:
            self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_tensor_cores=decode_uses_tensor_cores(shape, graph_mode=False))
            # fa2 everywhere: one compiled module serves causal and custom-mask steps (fa3 has no custom masks).
            self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
            self._write_index = torch.empty(0, dtype=torch.long, device=self.device)
        else:
            self._init_graph_mode(graph_batch_size, page_id_buffer)

    def _init_graph_mode(self, batch_size: int, page_id_buffer: torch.Tensor | None) -> None:
        """Static buffers for CUDA graphs: plan() rewrites them in place; page_id_buffer (int32, on the device,
        at least as long as the most pages a step may use) may be shared by backends that never run at once."""
        if self.shape is None:
            raise ValueError("CUDA-graph mode needs the attention shape up front")
        if batch_size < 1:
            raise ValueError("graph_batch_size must be >= 1")
        if page_id_buffer is None or page_id_buffer.dtype != torch.int32 or page_id_buffer.dim() != 1 \
                or page_id_buffer.numel() < batch_size:
            raise ValueError("CUDA-graph mode needs a 1-D int32 page_id_buffer of >= graph_batch_size entries")
        self._indptr_buf = torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device)
        self._last_len_buf = torch.ones(batch_size, dtype=torch.int32, device=self.device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=decode_uses_tensor_cores(self.shape, graph_mode=True),
            paged_kv_indptr_buffer=self._indptr_buf,
            paged_kv_indices_buffer=page_id_buffer, paged_kv_last_page_len_buffer=self._last_len_buf)
        self._prefill = None
        self._write_index = torch.zeros(2 * batch_size, dtype=torch.long, device=self.device)
        self._source_rows = torch.arange(batch_size, dtype=torch.long, device=self.device)
        self._triton_rope_append = graph_rope_append_uses_triton()

    # -- per step ---------------------------------------------------------------------------------------

    def plan(self, step: AttentionStep) -> None:
        meta = build_host_metadata(step)
        if self.graph_batch_size is not None:
            if not meta.is_decode or step.num_seqs != self.graph_batch_size:
                raise ValueError(f"this CUDA-graph backend runs decode steps of exactly "
                                 f"{self.graph_batch_size} sequences")
            # In place: a captured graph reads these very buffers.
            self._write_index.copy_(pinned(meta.write_index, self.device), non_blocking=True)
            self._source_rows.copy_(pinned(meta.source_rows, self.device), non_blocking=True)
        else:
            self._write_index = to_device(meta.write_index, self.device)
        self._is_decode = meta.is_decode
        self._mask = None if meta.mask is None else to_device(meta.mask, self.device)
        self._step, self._planned_for = meta, None
        if self.shape is not None:
            self._plan_kernels(self.shape)

    def _plan_kernels(self, shape: AttentionShape) -> None:
        meta = self._step
        assert meta is not None
        # Host arrays FlashInfer reads while planning go pinned; the page ids (only copied) go to the device
        # here, as a CPU tensor would make FlashInfer's graph-mode plan copy them synchronously.
        indptr, last_lens = pinned(meta.kv_page_indptr, self.device), pinned(meta.kv_last_page_lens, self.device)
        indices = to_device(meta.kv_page_ids, self.device)
        heads = (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim)
        if self._plan_copied is None:
            self._plan_copied = torch.cuda.Event()
        else:
            self._plan_copied.synchronize()  # (the previous step's start: normally long done)
        if self._is_decode:
            self._decode.plan(indptr, indices, last_lens, *heads, meta.page_size,
                              q_data_type=shape.dtype, kv_data_type=shape.dtype)
        else:
            self._prefill.plan(pinned(meta.qo_indptr, self.device), indptr, indices, last_lens, *heads,
                               meta.page_size, custom_mask=self._mask, causal=self._mask is None,
                               q_data_type=shape.dtype, kv_data_type=shape.dtype)
        self._plan_copied.record()
        self._planned_for = shape

    # -- per layer --------------------------------------------------------------------------------------

    def rope_and_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, apply_rope: RopeFn) -> torch.Tensor:
        if self.graph_batch_size is None or not self._triton_rope_append:
            return super().rope_and_forward(q, k, v, positions, cos_sin_cache, kv_cache, apply_rope)
        self._check_planned(q, k)
        decode_triton.rope_append(q, k, v, positions, cos_sin_cache, kv_cache, self._write_index, self._source_rows)
        return self._decode.run(q, kv_cache)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        self._check_planned(q, k)
        # Graph mode: padding rows repeat the K/V of the row they copy.
        append_kv(kv_cache, k, v, self._write_index, self._source_rows if self.graph_batch_size else None)
        return self._run(q, kv_cache)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over K/V the caller wrote at the step's slots (piecewise graphs, once per layer: no
        per-call checks once planned); q [T, Hq, D]."""
        if self._planned_for is None:
            self._check_planned(q, kv_cache[0, 0])
        return self._run(q, kv_cache, out)

    def _run(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._is_decode:
            return self._decode.run(q, kv_cache, out=out)
        # FlashInfer's prefill zero-fills an output it allocates itself: a kernel a layer that every row's result
        # overwrites (24 ms of an 8B offline run's 13.4 s on the H100).
        return self._prefill.run(q, kv_cache, out=torch.empty_like(q) if out is None else out)

    def _check_planned(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """k: [*, Hkv, D] (the step's keys, or a page's)."""
        if self._step is None:
            raise RuntimeError("plan() must run before forward()")
        if self._planned_for is None:
            self._plan_kernels(AttentionShape(q.shape[1], k.shape[-2], q.shape[2], q.dtype))

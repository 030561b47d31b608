"""Paged attention: the per-step metadata and the backend interface, with the torch reference backend.

KV cache layout (shared by every backend, FlashInfer's "NHD" combined layout), one tensor per layer:
    kv_cache[layer]: [num_pages, 2, page_size, num_kv_heads, head_dim]   (index 0 = K, 1 = V)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


# ops.apply_rope's signature: (q, k, positions, cos_sin_cache) -> (q, k) rotated.
RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttentionStep:
    """Host-side metadata for one step over B sequences and T new tokens (built once, used by every layer)."""

    page_size: int
    qo_indptr: Sequence[int]  # [B+1]: sequence b's new tokens are rows qo_indptr[b]:qo_indptr[b+1]
    kv_page_indptr: Sequence[int]  # [B+1]: sequence b's pages are kv_page_ids[kv_page_indptr[b]:...[b+1]]
    kv_page_ids: Sequence[int]  # physical KV page ids
    kv_last_page_lens: Sequence[int]  # [B], in 1..page_size
    slot_ids: Sequence[int]  # [T]: flat KV slots (page * page_size + offset) where each new token's K/V goes
    # Per sequence a [q_len][kv_len] boolean mask (True = attend), or None for causal; None overall = all causal.
    custom_masks: Sequence[Sequence[Sequence[bool]] | None] | None = None
    # [T]: for each new token the first new token that writes the same slot (itself if none before it does), when
    # the builder knows it; None: the host metadata finds it from slot_ids.
    source_rows: Sequence[int] | None = None
    # True when built by the executor's step inputs (engine/executor/step_inputs.py): every field an int64 numpy
    # array, checked against the others and the pool's ids, source_rows given. A backend may skip its own checks.
    validated: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.qo_indptr) - 1

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr[-1]

    def q_len(self, b: int) -> int:
        return self.qo_indptr[b + 1] - self.qo_indptr[b]

    def kv_len(self, b: int) -> int:
        num_pages = self.kv_page_indptr[b + 1] - self.kv_page_indptr[b]
        return (num_pages - 1) * self.page_size + self.kv_last_page_lens[b]

    @property
    def has_custom_mask(self) -> bool:
        return self.custom_masks is not None and any(m is not None for m in self.custom_masks)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token and attends causally (the decode kernel applies)."""
        return not self.has_custom_mask and all(self.q_len(b) == 1 for b in range(self.num_seqs))


class AttentionBackend(ABC):
    """plan() once per step, then forward() once per layer. forward appends the new K/V, then attends."""

    # Whether the executor may replay decode steps of this backend's kind from CUDA graphs (it then builds
    # graph-mode instances itself: engine/executor/cuda_graphs.py).
    supports_cuda_graphs: bool = False
    # Whether plan() takes a validated decode step (AttentionStep.validated) of fewer sequences than a graph's
    # batch and pads it itself as engine/executor/cuda_graphs.py pads (copies of row 0's token into its slot).
    pads_decode_steps: bool = False

    @abstractmethod
    def plan(self, step: AttentionStep) -> None: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], kv_cache [P, 2, S, Hkv, D] -> out [T, Hq, D]."""

    def rope_and_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, apply_rope: RopeFn) -> torch.Tensor:
        """Rotary embedding of q and k at positions [T] (apply_rope: the model's ops.apply_rope), then
        forward(). Backends with a kernel that rotates while it appends the K/V override this."""
        q, k = apply_rope(q, k, positions, cos_sin_cache)
        return self.forward(q, k, v, kv_cache)

    def kv_write_index(self) -> torch.Tensor | None:
        """For callers that write the step's K/V themselves (fused into the qkv projection), then call attend():
        [2T] int64 on the device, each new token's page, then each one's offset in its page. None (the
        default): forward() and rope_and_forward() append."""
        return None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention alone, the step's K/V already written by the caller: the fused one-row forward (where
        kv_write_index() is not None) and piecewise graphs (engine/executor/piecewise_graphs.py), which write
        it at the step's slot_ids. out: [T, Hq, D] in q's dtype to write the result into (returned)."""
        raise NotImplementedError(f"{type(self).__name__} appends K/V itself: use forward()")


class TorchAttention(AttentionBackend):
    """Reference backend: gather each sequence's pages into a padded batch and run SDPA with a mask."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def plan(self, step: AttentionStep) -> None:
        num_seqs, page_size = step.num_seqs, step.page_size
        q_lens = [step.q_len(b) for b in range(num_seqs)]
        kv_lens = [step.kv_len(b) for b in range(num_seqs)]
        max_q, max_kv = max(q_lens), max(kv_lens)
        max_pages = -(-max_kv // page_size)
        # Pages per sequence, padded with page 0 (its slots are masked out): [B * max_pages].
        page_idx = torch.zeros(num_seqs, max_pages, dtype=torch.long)
        mask = torch.zeros(num_seqs, max_q, max_pages * page_size, dtype=torch.bool)
        row_idx = []  # padded query row (b * max_q + i) of each of the T packed rows
        for b in range(num_seqs):
            pages = step.kv_page_ids[step.kv_page_indptr[b]:step.kv_page_indptr[b + 1]]
            page_idx[b, :len(pages)] = torch.tensor(pages, dtype=torch.long)
            mask[b, :q_lens[b], :kv_lens[b]] = self._sequence_mask(step, b, q_lens[b], kv_lens[b])
            row_idx.extend(b * max_q + i for i in range(q_lens[b]))
        slot_ids = torch.tensor(step.slot_ids, dtype=torch.long)
        self._page_idx = page_idx.view(-1).to(self.device)
        self._attn_mask = mask.unsqueeze(1).to(self.device)  # [B, 1, max_q, max_pages * S]
        self._row_idx = torch.tensor(row_idx, dtype=torch.long, device=self.device)
        self._write_page = (slot_ids // page_size).to(self.device)
        self._write_offset = (slot_ids % page_size).to(self.device)
        self._shape = (num_seqs, max_q, max_pages)
        self._is_packed = max_q == 1 or num_seqs == 1  # no padded query rows to scatter

    @staticmethod
    def _sequence_mask(step: AttentionStep, b: int, q_len: int, kv_len: int) -> torch.Tensor:
        custom = step.custom_masks[b] if step.custom_masks is not None else None
        if custom is not None:
            m = torch.tensor(custom, dtype=torch.bool)
            if m.shape != (q_len, kv_len):
                raise ValueError(f"attention mask of sequence {b} is {tuple(m.shape)}, want {(q_len, kv_len)}")
            return m
        # Causal: new token i sits at slot kv_len - q_len + i and sees every slot up to it.
        return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        kv_cache[self._write_page, 0, self._write_offset] = k.to(kv_cache.dtype)
        kv_cache[self._write_page, 1, self._write_offset] = v.to(kv_cache.dtype)
        return self.attend(q, kv_cache)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over K/V already written (forward() writes it; piecewise graphs write it themselves)."""
        num_seqs, max_q, max_pages = self._shape
        num_heads, head_dim = q.shape[1], q.shape[2]
        _, _, page_size, num_kv_heads, _ = kv_cache.shape
        # One copy: the pages gathered from a [2, Hkv, P, S, D] view straight into SDPA's layout, [2, B, Hkv,
        # max_pages * S, D] (a transposed view). Gathering whole pages, then permuting, copied twice and took
        # ~1.1 ms more per layer at 4 sequences of 512 tokens on 2 cores (float32).
        kv = kv_cache.permute(1, 3, 0, 2, 4).index_select(2, self._page_idx)
        kv = kv.view(2, num_kv_heads, num_seqs, max_pages * page_size, head_dim).transpose(1, 2)
        if self._is_packed:
            q_padded = q.view(num_seqs, max_q, num_heads, head_dim)
        else:
            q_padded = q.new_zeros(num_seqs * max_q, num_heads, head_dim)
            q_padded[self._row_idx] = q
            q_padded = q_padded.view(num_seqs, max_q, num_heads, head_dim)
        result = F.scaled_dot_product_attention(q_padded.transpose(1, 2), kv[0].to(q.dtype), kv[1].to(q.dtype),
                                                attn_mask=self._attn_mask, enable_gqa=True)
        result = result.transpose(1, 2).reshape(num_seqs * max_q, num_heads, head_dim)
        result = result if self._is_packed else result[self._row_idx]
        return result if out is None else out.copy_(result)

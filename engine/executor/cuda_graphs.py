"""Decode steps replayed from CUDA graphs, one graph per bucketed batch size.

Per-step host work (Python, ~15 kernel launches per layer) costs tens of milliseconds on an H100, more than
the GPU needs to read an 8B model's weights: graphs turn a decode step into one launch.

How it works:
- At start-up, for each bucket size S (largest first, sharing one memory pool): a FlashInferAttention in
  CUDA-graph mode (static page-table and write-index buffers), planned for a dummy step, then the decoder's
  forward over static input buffers is captured. Outputs stay in the pool; a replay overwrites them.
- A decode step of B <= max bucket sequences is padded to the smallest bucket S >= B with copies of row 0
  (its token, position, slot and last page): the copies write row 0's own K/V into row 0's slot (see
  FlashInferAttention's graph mode), so padding never changes live KV and needs no reserved page. Then:
  copy token ids/positions into the static inputs, plan (host work plus small host-to-device copies into
  the static buffers), replay. Nothing in the graph synchronises with the host.
- Capture runs the decoder (warm-up) on page 0 of every layer: that page is saved before and restored
  after, so capturing never changes the pool.
- Steps with prefill tokens, custom masks, more sequences than the largest bucket or more pages than the
  static page buffer go to the eager path (supports() says which).
- With the head (GraphConfig.head; not under tensor parallelism, whose LM head gathers across ranks), each graph
  also computes the logits of all its rows and their argmax, written into one token buffer shared by every
  bucket, and starts by taking the rows' fed tokens from that buffer (`feed_src`): a plain greedy decode step
  is then one replay and one copy of its tokens to the host, with no launches of its own for the feed, the LM
  head or the argmax (each a few microseconds of host, a step's fixed cost at small batches). Invariant: the
  buffer holds the tokens of the last replay, row r = command r of that step, until the next replay rewrites it
  (after its own feed has read it: stream order).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ContextManager, Protocol

import numpy as np
import torch

from pie_server.engine.executor.sampling_filters import argmax_rows
from pie_server.kernels import triton_attention
from pie_server.kernels.attention import AttentionBackend, AttentionStep
from pie_server.kernels.flashinfer_attention import WORKSPACE_BYTES, AttentionShape, FlashInferAttention
from pie_server.kernels.triton_attention import TritonDecodeAttention
from pie_server.kernels.transfer import pinned

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class Decoder(Protocol):
    """What the runner needs of the model (engine/model/llama.py's LlamaModel)."""

    device: torch.device
    dtype: torch.dtype
    config: object

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                kv_caches: list[torch.Tensor]) -> torch.Tensor: ...

    def graph_mode(self, fuse_one_row: bool = True) -> ContextManager[None]: ...

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class GraphConfig:
    max_batch_size: int
    max_pages_per_step: int  # capacity of the static page-id buffer shared by all buckets
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    # Fused kernels: Triton decode attention (RoPE + KV append in one kernel) for buckets up to
    # triton_attention.max_batch_size() and the fused one-row forward at batch 1. Off: FlashInfer and the
    # unfused kernels everywhere (for A/B benchmarks).
    fused: bool = True
    # Logits and greedy tokens inside the graph, fed tokens taken inside it (see the module's docstring).
    head: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_pages_per_step < 1:
            raise ValueError("max_batch_size and max_pages_per_step must be positive")
        if not self.buckets or any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be distinct positive sizes in increasing order")

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        """The bucket sizes to capture: those below max_batch_size, plus max_batch_size itself (cached: every
        decode step asks)."""
        return tuple(sorted({b for b in self.buckets if b < self.max_batch_size} | {self.max_batch_size}))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | _NoReplay
    attention: AttentionBackend
    hidden: torch.Tensor  # [S, H], written by each replay
    logits: torch.Tensor | None  # [S, V] float32 (with the head), likewise


class _NoReplay:
    """A host-only bucket's graph (CudaGraphDecoder(host_only=True))."""

    def replay(self) -> None:
        pass


@dataclass(frozen=True)
class GraphStep:
    """One replay's outputs for its B live rows: views that the next replay overwrites."""

    hidden: torch.Tensor  # [B, H]
    logits: torch.Tensor | None  # [B, V] float32; None without the head
    tokens: torch.Tensor | None  # [B] int64 argmax of logits, a view of the shared token buffer; None without


class CudaGraphDecoder:
    """Replays captured decode steps; supports() says which steps it takes, forward() runs one."""

    def __init__(self, model: Decoder, kv_caches: list[torch.Tensor], shape: AttentionShape, page_size: int,
                 config: GraphConfig, host_only: bool = False) -> None:
        """host_only: capture nothing; every bucket plans with Triton decode attention and its replay runs
        nothing, so the host's side of a step (staging, planning) runs on any device, CPU included (tests and
        bench/submit_host.py)."""
        self.model, self.kv_caches, self.shape, self.config = model, kv_caches, shape, config
        self.page_size = page_size
        device = model.device
        self._workspace = None if host_only else torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._page_ids = torch.zeros(config.max_pages_per_step, dtype=torch.int32, device=device)
        max_size = config.sizes[-1]
        # token ids; positions; feed_src (the row of the token buffer whose token a row takes, or -1)
        self._inputs = torch.zeros(3, max_size, dtype=torch.long, device=device)
        self._host_inputs = np.zeros(3 * max_size, np.int64)  # staged here, then copied through pinned memory
        self._tokens = torch.zeros(max_size, dtype=torch.long, device=device)  # the last replay's argmax
        # The last replay's logits, one buffer for every bucket (each bucket's own would hold sum(S) x V floats).
        self._logits = torch.zeros(max_size, model.config.vocab_size, dtype=torch.float32, device=device) \
            if config.head else None  # type: ignore[attr-defined]
        self._graphs: dict[int, _Graph] = {}
        self.num_replays = 0
        if host_only:
            self._graphs = {size: self._host_only(size) for size in config.sizes}
            return
        self._pool = torch.cuda.graph_pool_handle()
        saved = [cache[0].clone() for cache in kv_caches]
        for size in reversed(config.sizes):  # largest first: later captures reuse its memory
            self._graphs[size] = self._capture(size)
        for cache, page in zip(kv_caches, saved):
            cache[0].copy_(page)
        torch.cuda.synchronize(device)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def supports(self, step: AttentionStep) -> bool:
        num_seqs = step.num_seqs
        # Every sequence has >= 1 new token, so one token per sequence <=> as many tokens as sequences.
        is_decode = step.num_tokens == num_seqs and not step.has_custom_mask
        num_pages = step.kv_page_indptr[-1] + self.config.sizes[-1] - num_seqs
        return is_decode and 1 <= num_seqs <= self.config.sizes[-1] and \
            num_pages <= self.config.max_pages_per_step and step.page_size == self.page_size

    def bucket(self, num_seqs: int) -> int:
        for size in self.config.sizes:
            if size >= num_seqs:
                return size
        raise ValueError(f"{num_seqs} sequences exceed the largest captured batch {self.config.sizes[-1]}")

    def forward(self, token_ids: np.ndarray, positions: np.ndarray, step: AttentionStep,
                fed: tuple[torch.Tensor, torch.Tensor] | None = None,
                feed_src: np.ndarray | None = None) -> GraphStep:
        """One decode step. token_ids, positions: [B] int64; fed: ([F] rows, [F] token ids) on the device that
        replace those rows' token ids (tokens of the previous step that the host has not seen); feed_src (with
        the head only): [B] int64, the row of the last replay's tokens that each row takes, -1: its own id."""
        if not self.supports(step):
            raise ValueError("not a decode step this runner can replay (see supports())")
        if feed_src is not None and not self.config.head:
            raise ValueError("feed_src needs the graphs' head (GraphConfig.head)")
        num_seqs = step.num_seqs
        size = self.bucket(num_seqs)
        entry = self._graphs[size]
        pads_itself = step.validated and entry.attention.pads_decode_steps
        entry.attention.plan(step if pads_itself else self._padded(step, size))
        host = self._host_inputs[:3 * size].reshape(3, size)  # token ids, positions, feed_src; padding copies row 0
        host[0, :num_seqs], host[0, num_seqs:] = token_ids, token_ids[0]
        host[1, :num_seqs], host[1, num_seqs:] = positions, positions[0]
        host[2] = -1
        if feed_src is not None:
            host[2, :num_seqs] = feed_src
        self._inputs[:, :size].copy_(pinned(host, self.model.device), non_blocking=True)
        if fed is not None:
            self._inputs[0].index_copy_(0, *fed)
        entry.graph.replay()
        self.num_replays += 1
        if entry.logits is None:
            return GraphStep(entry.hidden[:num_seqs], None, None)
        return GraphStep(entry.hidden[:num_seqs], entry.logits[:num_seqs], self._tokens[:num_seqs])

    def holds(self, tokens: torch.Tensor) -> bool:
        """Whether tokens is the token buffer's view of the last replay (GraphStep.tokens): its rows can be fed
        inside the next replay (feed_src)."""
        return self.config.head and tokens.data_ptr() == self._tokens.data_ptr() and tokens.dim() == 1

    # -- capture ----------------------------------------------------------------------------------------

    def _capture(self, size: int) -> _Graph:
        attention = self._attention_for(size)
        attention.plan(self._padded(_one_token_step(self.page_size), size))
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with self.model.graph_mode(self.config.fused):
            with torch.cuda.stream(stream):  # warm-up outside the graph: lazy inits and JIT, allocator growth
                for _ in range(2):
                    self._step_body(size, attention)
            torch.cuda.current_stream(self.model.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden, logits = self._step_body(size, attention)
        return _Graph(graph, attention, hidden, logits)

    def _host_only(self, size: int) -> _Graph:
        attention = TritonDecodeAttention(self.model.device, self.shape, size, self.config.max_pages_per_step)
        hidden = torch.zeros(size, 1, device=self.model.device)
        return _Graph(_NoReplay(), attention, hidden, None if self._logits is None else self._logits[:size])

    def _step_body(self, size: int, attention: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a replay of the size bucket runs: [S, H] hidden states and (with the head) [S, V] logits."""
        input_ids, positions = self._inputs[0, :size], self._inputs[1, :size]
        if self.config.head:  # the fed rows' tokens, from the last replay's argmax
            src = self._inputs[2, :size]
            input_ids = torch.where(src >= 0, self._tokens.index_select(0, src.clamp(min=0)), input_ids)
        hidden = self.model.forward(input_ids, positions, attention, self.kv_caches)
        if not self.config.head:
            return hidden, None
        assert self._logits is not None
        logits = self.model.logits(hidden, out=self._logits[:size])
        assert logits is not None  # no tensor parallelism with the head
        self._tokens[:size].copy_(argmax_rows(logits))
        return hidden, logits

    def _attention_for(self, size: int) -> AttentionBackend:
        if self.config.fused and size <= triton_attention.max_batch_size() and triton_attention.is_available():
            return TritonDecodeAttention(self.model.device, self.shape, size, self.config.max_pages_per_step)
        # FlashInfer buckets share the workspace and the page-id buffer: only one of them runs at a time.
        return FlashInferAttention(self.model.device, self.shape, workspace=self._workspace,
                                   graph_batch_size=size, page_id_buffer=self._page_ids)

    @staticmethod
    def _padded(step: AttentionStep, size: int) -> AttentionStep:
        """The step plus (size - B) copies of sequence 0's new token, attending to one slot of its last page."""
        num_pad = size - step.num_seqs
        qo_indptr, page_indptr = np.asarray(step.qo_indptr), np.asarray(step.kv_page_indptr)
        page_ids, slot_ids = np.asarray(step.kv_page_ids), np.asarray(step.slot_ids)
        tail = np.arange(1, num_pad + 1)
        return AttentionStep(
            page_size=step.page_size,
            qo_indptr=np.concatenate([qo_indptr, qo_indptr[-1] + tail]),
            kv_page_indptr=np.concatenate([page_indptr, page_indptr[-1] + tail]),
            kv_page_ids=np.concatenate([page_ids, np.full(num_pad, page_ids[page_indptr[1] - 1])]),
            kv_last_page_lens=np.concatenate([np.asarray(step.kv_last_page_lens), np.ones(num_pad, np.int64)]),
            slot_ids=np.concatenate([slot_ids, np.full(num_pad, slot_ids[0])]),
            # the padding rows write sequence 0's slot after it: its first writer is theirs
            source_rows=None if step.source_rows is None else np.concatenate(
                [np.asarray(step.source_rows), np.full(num_pad, step.source_rows[0])]))


def build_decode_graphs(model: Decoder, kv_caches: list[torch.Tensor], page_size: int,
                        max_batch_size: int, fused: bool = True, head: bool = False) -> CudaGraphDecoder:
    """Captures decode graphs for a LlamaModel over its KV pool, buckets up to max_batch_size sequences (head:
    the LM head and greedy tokens inside them). Safe at any time: capture saves and restores the one page it
    touches."""
    cfg = model.config
    shape = AttentionShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.dtype)  # type: ignore[attr-defined]
    num_pages = kv_caches[0].shape[0]
    config = GraphConfig(max_batch_size=max_batch_size, max_pages_per_step=num_pages + max_batch_size, fused=fused,
                         head=head)
    return CudaGraphDecoder(model, kv_caches, shape, page_size, config)


def _one_token_step(page_size: int) -> AttentionStep:
    """The capture step's real row: one token in slot 0 of page 0 (saved and restored around capture)."""
    return AttentionStep(page_size=page_size, qo_indptr=[0, 1], kv_page_indptr=[0, 1], kv_page_ids=[0],
                         kv_last_page_lens=[1], slot_ids=[0])

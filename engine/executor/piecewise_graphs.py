"""Steps with prefill tokens, replayed piecewise from CUDA graphs: all but attention, bucketed by token count.

A step that is not a plain decode (a prompt chunk, an appended turn, several tokens of one sequence, a custom
mask) runs the decoder eagerly: about fifteen kernel launches a layer from Python, which for a small model on
a fast GPU costs several times the work itself. Attention is what depends on the step's shape (sequences,
pages, masks); everything else in a layer maps each token's row to a row. So, as vLLM's piecewise graphs do,
each bucket of N tokens captures L + 1 graphs of the row-wise work between the attentions:

    piece 0:      embed, layer 0 before attention, its RoPE and K/V write   -> q, residual
    piece l:      layer l-1 after attention, layer l up to its K/V write    -> q, residual   (l = 1 .. L-1)
    piece L:      layer L-1 after attention, the final norm                 -> hidden

and a step of T <= N tokens replays them in order with layer l's attention kernel run eagerly in between
(FlashInfer's prefill kernel, planned once per step for the real T tokens, over the K/V the piece wrote).

Invariants:
- The carried buffers (token ids, positions, K/V write index, q, residual, attention output, final hidden) are
  allocated once for the largest bucket; bucket N uses their first N rows, and the graphs read and write only
  those buffers (and the KV cache, at the write index).
- Rows T..N-1 are padding (token 0 at position 0): the pieces are row-wise (LlamaModel's invariant), so they
  never change rows < T, and attention reads only rows < T. A padding row writes row 0's K/V into row 0's slot
  (its source row is 0), so padding never changes the cache.
- Pieces of all buckets share one memory pool; only one piece runs at a time (one stream).

`capture=False` runs the same pieces without graphs (CPU tests check padding and order against forward()).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from pie_server.kernels.attention import AttentionBackend, AttentionStep
from pie_server.kernels.transfer import pinned

if TYPE_CHECKING:
    from pie_server.engine.model.llama import LlamaModel

# Bucket sizes (tokens) up to the largest a step may have. A step past the largest captured bucket runs the whole
# decoder eagerly: on the H200 an agentic run's ~680-token steps (128 agents appending turns, SmolLM2 shape) took
# 26 ms of host time to launch. EngineConfig.piecewise_max_tokens (`pie serve --piecewise-max-tokens`) says where
# capture stops (docs/decisions/piecewise-graphs.md).
BUCKET_SIZES = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DEFAULT_MAX_TOKENS = 512
DEFAULT_BUCKETS = tuple(b for b in BUCKET_SIZES if b <= DEFAULT_MAX_TOKENS)


class PiecewiseDecoder(Protocol):
    """What the runner needs of the model (engine/model/llama.py's LlamaModel)."""

    device: torch.device
    dtype: torch.dtype
    layers: list

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def before_attention(self, index: int, hidden: torch.Tensor,
                         residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rope_and_write_kv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                          write_index: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor: ...

    def after_attention(self, index: int, attended: torch.Tensor,
                        residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PiecewiseConfig:
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # token counts, increasing
    capture: bool = True  # False: run the pieces eagerly (tests on CPU)

    def __post_init__(self) -> None:
        if not self.buckets or any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be distinct positive token counts in increasing order")

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    @classmethod
    def for_step_budget(cls, max_batch_tokens: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> "PiecewiseConfig":
        """The bucket sizes up to max_tokens, none larger than a step can be."""
        limit = min(max_batch_tokens, max_tokens)
        return cls(tuple(sorted({b for b in BUCKET_SIZES if b < limit} | {limit})))


@dataclass
class _Carried:
    """Views of the first N rows of the runner's buffers: one bucket's inputs and outputs."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    write_index: torch.Tensor  # [2N] int64: each row's page, then each row's offset in its page
    source_rows: torch.Tensor  # [N] int64: the row whose K/V each row writes (itself, 0 for padding)
    q: torch.Tensor  # [N, Hq, D], rotated
    residual: torch.Tensor  # [N, H]
    attended: torch.Tensor  # [N, Hq D]
    hidden: torch.Tensor  # [N, H], the final hidden states


class PiecewiseGraphs:
    """Runs steps of up to config.max_tokens tokens as pieces; supports() says which, forward() runs one."""

    def __init__(self, model: PiecewiseDecoder, kv_caches: list[torch.Tensor], hidden_size: int,
                 q_shape: tuple[int, int], config: PiecewiseConfig = PiecewiseConfig()) -> None:
        """q_shape: (Hq, D)."""
        self.model, self.kv_caches, self.config = model, kv_caches, config
        rows, device, dtype = config.max_tokens, model.device, model.dtype
        # Bucket N's int64 inputs, its first 5N entries: token ids, positions, K/V pages, offsets, source rows (all
        # zeros: a warm-up writes page 0, restored).
        self._inputs = torch.zeros(5 * rows, dtype=torch.long, device=device)
        self._q = torch.zeros(rows, *q_shape, dtype=dtype, device=device)
        self._residual = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self._attended = torch.zeros(rows, q_shape[0] * q_shape[1], dtype=dtype, device=device)
        self._hidden = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.num_replays = 0
        self._pieces: dict[int, list[Callable[[], None]]] = {}
        pool = torch.cuda.graph_pool_handle() if config.capture else None
        warm_up = torch.cuda.Stream(device) if config.capture else None
        saved = [cache[0].clone() for cache in kv_caches] if config.capture else []
        for size in reversed(config.buckets):  # largest first: later captures reuse its memory
            pieces = self._pieces_of(self._carried(size))
            self._pieces[size] = [self._capture(piece, pool, warm_up) for piece in pieces] if config.capture \
                else pieces
        for cache, page in zip(kv_caches, saved):
            cache[0].copy_(page)
        if config.capture:
            torch.cuda.synchronize(device)

    @classmethod
    def for_model(cls, model: "LlamaModel", kv_caches: list[torch.Tensor],
                  config: PiecewiseConfig) -> "PiecewiseGraphs":
        cfg = model.config
        return cls(model, kv_caches, cfg.hidden_size, (cfg.num_heads, cfg.head_dim), config)

    def supports(self, step: AttentionStep) -> bool:
        return 1 <= step.num_tokens <= self.config.max_tokens

    def bucket(self, num_tokens: int) -> int:
        for size in self.config.buckets:
            if size >= num_tokens:
                return size
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.config.max_tokens}")

    @torch.inference_mode()
    def forward(self, token_ids: np.ndarray, positions: np.ndarray, step: AttentionStep,
                attention: AttentionBackend, fed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The step's final hidden states [T, H] (a view the next step overwrites). token_ids, positions: [T]
        int64; attention: an eager backend, planned here for the step; fed: ([F] rows, [F] token ids) on the
        device that replace those rows' token ids."""
        num_tokens = len(token_ids)
        if not self.supports(step) or num_tokens != step.num_tokens:
            raise ValueError(f"a step of {num_tokens} tokens is not one this runner takes (see supports())")
        size = self.bucket(num_tokens)
        attention.plan(step)
        pad = np.zeros(size - num_tokens, np.int64)
        slots = np.concatenate([np.asarray(step.slot_ids, np.int64), pad + step.slot_ids[0]])
        rows = np.concatenate([token_ids, pad, positions, pad, slots // step.page_size, slots % step.page_size,
                               np.arange(num_tokens), pad])
        self._inputs[:5 * size].copy_(pinned(rows, self.model.device), non_blocking=True)
        if fed is not None:
            self._inputs.index_copy_(0, *fed)  # token ids come first
        pieces, q = self._pieces[size], self._q[:num_tokens]
        attended = self._attended[:num_tokens].view(q.shape)  # [T, Hq, D]: the backend writes into it
        pieces[0]()
        for index, kv_cache in enumerate(self.kv_caches):
            attention.attend(q, kv_cache, out=attended)
            pieces[index + 1]()
        self.num_replays += 1
        return self._hidden[:num_tokens]

    # -- pieces -----------------------------------------------------------------------------------------

    def _carried(self, size: int) -> _Carried:
        inputs = self._inputs
        return _Carried(inputs[:size], inputs[size:2 * size], inputs[2 * size:4 * size], inputs[4 * size:5 * size],
                        self._q[:size], self._residual[:size], self._attended[:size], self._hidden[:size])

    def _pieces_of(self, carried: _Carried) -> list[Callable[[], None]]:
        """The L + 1 row-wise pieces of one bucket, each reading and writing only `carried`."""
        model, kv_caches = self.model, self.kv_caches

        def through_kv_write(index: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
            qkv, residual = model.before_attention(index, hidden, residual)
            q = model.rope_and_write_kv(qkv, carried.positions, kv_caches[index], carried.write_index,
                                        carried.source_rows)
            _store(carried.q, q)
            _store(carried.residual, residual)

        def first() -> None:
            through_kv_write(0, model.embed(carried.input_ids), None)

        def between(index: int) -> Callable[[], None]:
            def piece() -> None:
                through_kv_write(index, *model.after_attention(index - 1, carried.attended, carried.residual))
            return piece

        def last() -> None:
            hidden, residual = model.after_attention(len(kv_caches) - 1, carried.attended, carried.residual)
            _store(carried.hidden, model.final_norm(hidden, residual))

        return [first, *(between(i) for i in range(1, len(kv_caches))), last]

    def _capture(self, piece: Callable[[], None], pool: object, stream: torch.cuda.Stream) -> Callable[[], None]:
        device = self.model.device
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(stream):  # warm-up outside the graph: lazy inits, JIT
            piece()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            piece()
        return graph.replay


def _store(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """buffer := value, unless value is buffer itself (GPU ops update the residual in place)."""
    if value.data_ptr() != buffer.data_ptr() or value.stride() != buffer.stride():
        buffer.copy_(value)

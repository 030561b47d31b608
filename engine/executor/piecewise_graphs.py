"""Steps with prefill tokens, replayed piecewise from CUDA graphs: all but attention, bucketed by token count.

A step that is not a plain decode (a prompt chunk, an appended turn, several tokens of one sequence, a custom
mask) runs the decoder eagerly: about fifteen kernel launches a layer from Python, which for a small model on
a fast GPU costs several times the work itself. Attention is what depends on the step's shape (sequences,
pages, masks); everything else in a layer maps each token's row to a row. So, as vLLM's piecewise graphs do,
each bucket of N tokens captures L + 1 graphs of the row-wise work between the attentions:

    piece 0:      embed, layer 0 before attention              -> qkv, residual
    piece l:      layer l-1 after attention, layer l before it  -> qkv, residual      (l = 1 .. L-1)
    piece L:      layer L-1 after attention, the final norm     -> hidden

and a step of T <= N tokens replays them in order with layer l's attention run eagerly in between (RoPE, the
K/V append and FlashInfer's prefill kernel, planned once per step for the real T tokens).

Invariants:
- The carried buffers (token ids, positions, qkv, residual, attention output, final hidden) are allocated once
  for the largest bucket; bucket N uses their first N rows, and the graphs read and write only those buffers.
- Rows T..N-1 are padding (token 0 at position 0): the pieces are row-wise (LlamaModel's invariant), so they
  never change rows < T, and attention reads and writes only rows < T. Padding K/V is never written.
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

DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class PiecewiseDecoder(Protocol):
    """What the runner needs of the model (engine/model/llama.py's LlamaModel)."""

    device: torch.device
    dtype: torch.dtype
    layers: list

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def before_attention(self, index: int, hidden: torch.Tensor,
                         residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
               kv_cache: torch.Tensor) -> torch.Tensor: ...

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
    def for_step_budget(cls, max_batch_tokens: int) -> "PiecewiseConfig":
        """The default buckets, none larger than a step can be."""
        limit = min(max_batch_tokens, DEFAULT_BUCKETS[-1])
        return cls(tuple(sorted({b for b in DEFAULT_BUCKETS if b < limit} | {limit})))


@dataclass
class _Carried:
    """Views of the first N rows of the runner's buffers: one bucket's inputs and outputs."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    qkv: torch.Tensor  # [N, (Hq + 2 Hkv) D]
    residual: torch.Tensor  # [N, H]
    attended: torch.Tensor  # [N, Hq D]
    hidden: torch.Tensor  # [N, H], the final hidden states


class PiecewiseGraphs:
    """Runs steps of up to config.max_tokens tokens as pieces; supports() says which, forward() runs one."""

    def __init__(self, model: PiecewiseDecoder, kv_caches: list[torch.Tensor], hidden_size: int, qkv_size: int,
                 attended_size: int, config: PiecewiseConfig = PiecewiseConfig()) -> None:
        self.model, self.kv_caches, self.config = model, kv_caches, config
        rows, device, dtype = config.max_tokens, model.device, model.dtype
        self._ids = torch.zeros(2, rows, dtype=torch.long, device=device)  # token ids; positions
        self._qkv = torch.zeros(rows, qkv_size, dtype=dtype, device=device)
        self._residual = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self._attended = torch.zeros(rows, attended_size, dtype=dtype, device=device)
        self._hidden = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.num_replays = 0
        self._pieces: dict[int, list[Callable[[], None]]] = {}
        pool = torch.cuda.graph_pool_handle() if config.capture else None
        warm_up = torch.cuda.Stream(device) if config.capture else None
        for size in reversed(config.buckets):  # largest first: later captures reuse its memory
            pieces = self._pieces_of(self._carried(size))
            self._pieces[size] = [self._capture(piece, pool, warm_up) for piece in pieces] if config.capture \
                else pieces
        if config.capture:
            torch.cuda.synchronize(device)

    @classmethod
    def for_model(cls, model: "LlamaModel", kv_caches: list[torch.Tensor], config: PiecewiseConfig) -> "PiecewiseGraphs":
        cfg = model.config
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return cls(model, kv_caches, cfg.hidden_size, q_size + 2 * kv_size, q_size, config)

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
        inputs = pinned(np.concatenate([token_ids, pad, positions, pad]), self.model.device)
        self._ids[:, :size].copy_(inputs.view(2, size), non_blocking=True)
        if fed is not None:
            self._ids[0].index_copy_(0, *fed)
        pieces = self._pieces[size]
        qkv, row_positions = self._qkv[:num_tokens], self._ids[1, :num_tokens]
        pieces[0]()
        for index, kv_cache in enumerate(self.kv_caches):
            self._attended[:num_tokens].copy_(self.model.attend(qkv, row_positions, attention, kv_cache))
            pieces[index + 1]()
        self.num_replays += 1
        return self._hidden[:num_tokens]

    # -- pieces -----------------------------------------------------------------------------------------

    def _carried(self, size: int) -> _Carried:
        return _Carried(self._ids[0, :size], self._ids[1, :size], self._qkv[:size], self._residual[:size],
                        self._attended[:size], self._hidden[:size])

    def _pieces_of(self, carried: _Carried) -> list[Callable[[], None]]:
        """The L + 1 row-wise pieces of one bucket, each reading and writing only `carried`."""
        model, num_layers = self.model, len(self.kv_caches)

        def first() -> None:
            qkv, residual = model.before_attention(0, model.embed(carried.input_ids), None)
            _store(carried.qkv, qkv)
            _store(carried.residual, residual)

        def between(index: int) -> Callable[[], None]:
            def piece() -> None:
                hidden, residual = model.after_attention(index - 1, carried.attended, carried.residual)
                qkv, residual = model.before_attention(index, hidden, residual)
                _store(carried.qkv, qkv)
                _store(carried.residual, residual)
            return piece

        def last() -> None:
            hidden, residual = model.after_attention(num_layers - 1, carried.attended, carried.residual)
            _store(carried.hidden, model.final_norm(hidden, residual))

        return [first, *(between(i) for i in range(1, num_layers)), last]

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
    if value.data_ptr() != buffer.data_ptr():
        buffer.copy_(value)

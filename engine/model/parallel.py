"""Tensor parallelism of the Llama decoder, Megatron-style: which slice of each weight a rank holds, and the
collectives its parallel layers need.

Rank r of P holds (row = output feature of an HF [out, in] weight):
- column-parallel q/k/v and gate/up projections: rows of heads r*Hq/P.., r*Hkv/P.. and of the MLP width r*I/P..
  (their biases alike). Attention therefore runs on the rank's own heads, and its KV cache holds only its
  Hkv/P heads;
- row-parallel o and down projections: the matching input columns. Each rank's product is a partial sum:
  one all-reduce after attention, one after the MLP, then the (replicated) bias, added once;
- the embedding and the norms replicated (a lookup reads T rows; splitting it by vocabulary would cost one
  more all-reduce per step to save memory only);
- the LM head vocab-parallel: rows r*Vp/P.. of the vocabulary padded to Vp, a multiple of P (pad rows are zero
  and their logits are cut off). Replicated it would be read whole on rank 0 every step: 1 GB for Llama-3.1-8B
  at bf16, half again the 1.75 GB of decoder weights each of 8 ranks reads; split, each rank reads Vp/P rows and
  rank 0 gathers [N, Vp/P] logits from every rank (N = sampled rows: 0.25 MB per rank for one decode row).
Sampling stays on rank 0, over the gathered logits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pie_server.engine.config import ModelConfig

# HF name fragments of column-parallel tensors (weights and biases: split by rows).
_COLUMN = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".mlp.gate_proj.", ".mlp.up_proj.")
# Row-parallel weights (split by columns); their biases are replicated.
_ROW = (".self_attn.o_proj.weight", ".mlp.down_proj.weight")
LM_HEAD = "lm_head.weight"


class SliceSource(Protocol):
    """A tensor or a safetensors slice: indexing reads only the part asked for."""

    def __getitem__(self, index: Any) -> torch.Tensor: ...


def check_divisible(cfg: ModelConfig, world_size: int) -> None:
    """ValueError unless P ranks can split the model's heads, KV heads and MLP width evenly."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    for what, count in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                        ("MLP width (intermediate_size)", cfg.intermediate_size)):
        if count % world_size:
            raise ValueError(f"--tensor-parallel-size {world_size} does not divide the model's {count} {what}; "
                             f"choose a size that divides {cfg.num_heads} heads and {cfg.num_kv_heads} KV heads")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world_size` tensor-parallel ranks."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range [0, {self.world_size})")

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The shapes one rank computes with: its heads, KV heads and MLP width (vocabulary and hidden size whole)."""
        check_divisible(cfg, self.world_size)
        p = self.world_size
        return dataclasses.replace(cfg, num_heads=cfg.num_heads // p, num_kv_heads=cfg.num_kv_heads // p,
                                   intermediate_size=cfg.intermediate_size // p)

    def vocab_rows(self, vocab_size: int) -> int:
        """LM-head rows per rank: the vocabulary padded to a multiple of world_size, split evenly."""
        return -(-vocab_size // self.world_size)

    def read(self, name: str, source: SliceSource, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's part of the HF tensor `name` of full `shape`, reading only that part of `source`."""
        if name == LM_HEAD:
            return self.vocab_part(source, shape[0])
        if any(part in name for part in _COLUMN):
            return source[self._bounds(shape[0])]
        if any(name.endswith(part) for part in _ROW):
            return source[:, self._bounds(shape[1])]
        return source[:]

    def vocab_part(self, source: SliceSource, vocab_size: int) -> torch.Tensor:
        """Rows [r * Vp/P, (r + 1) * Vp/P) of a [V, H] matrix, zero rows past V (the padding)."""
        rows = self.vocab_rows(vocab_size)
        start = min(self.rank * rows, vocab_size)
        stop = min(start + rows, vocab_size)
        part = source[start:stop]
        if stop - start == rows:
            return part
        pad = torch.zeros(rows - (stop - start), *part.shape[1:], dtype=part.dtype, device=part.device)
        return torch.cat([part, pad])

    def _bounds(self, size: int) -> slice:
        step = size // self.world_size
        return slice(self.rank * step, (self.rank + 1) * step)


@dataclass(frozen=True)
class TensorParallel:
    """A rank's shard and the collectives of the parallel layers, over torch.distributed's default group
    (NCCL on CUDA, gloo on CPU). Every rank must make the same calls in the same order: the executors run the
    same steps (engine/executor/tensor_parallel.py)."""

    shard: Shard

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def world_size(self) -> int:
        return self.shard.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place (the row-parallel layers' partial products)."""
        dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (in place)."""
        dist.broadcast(tensor, src=0)
        return tensor

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Rank 0: the [N, V] logits from every rank's [N, Vp/P] part; other ranks: None (they only send)."""
        if self.rank != 0:
            dist.gather(local, None, dst=0)
            return None
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=1)[:, :vocab_size]

    def agree_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (KV pages: each rank sizes its pool, all use the same count)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

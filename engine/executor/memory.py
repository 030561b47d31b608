"""Sizing the KV pool on a GPU: what remains of gpu_memory_utilization x the device's memory after the
weights, the peak activations of the largest step, and the decode graphs' memory pool.

Measured, not estimated: before the pool exists the executor runs its largest prefill step (max_batch_tokens
tokens, up to max_batch_size sampled rows) and its largest decode step (max_batch_size sequences) eagerly on
a small probe pool and reads PyTorch's peak allocation over each. A captured decode graph keeps about one
eager decoder pass's activations in its private pool, plus its own attention workspace; piecewise graphs keep
those of one step of their largest bucket (pieces_probe).
"""
from __future__ import annotations

from dataclasses import dataclass

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.step import ForwardCommand, OutputSpec, SamplingParams

GIB = 1 << 30
# The probes sample like the costliest request (top-p sorts the whole vocabulary per row).
_PROBE_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one device. in_use: everything allocated before the pool (weights, CUDA context, workspaces)."""

    total_bytes: int
    in_use_bytes: int
    activation_bytes: int  # peak of the largest eager step above what it was given
    graph_bytes: int  # the decode graphs' pool and workspace (0 without graphs)
    utilization: float  # share of total_bytes the engine may use

    def __post_init__(self) -> None:
        if not 0.0 < self.utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if min(self.total_bytes, self.in_use_bytes, self.activation_bytes, self.graph_bytes) < 0:
            raise ValueError("byte counts must be >= 0")

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.utilization * self.total_bytes) - self.in_use_bytes - self.activation_bytes - \
            self.graph_bytes

    def num_pages(self, bytes_per_page: int) -> int:
        """Pages that fit the budget; RuntimeError (saying where the memory went) when not even one does."""
        num_pages = max(self.kv_budget_bytes, 0) // bytes_per_page
        if num_pages < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache: {self.describe()}; raise "
                               "--gpu-memory-utilization or lower --max-batch-tokens / --max-batch-size")
        return num_pages

    def describe(self) -> str:
        return (f"{self.utilization:.0%} of {self.total_bytes / GIB:.1f} GiB = "
                f"{self.utilization * self.total_bytes / GIB:.1f} GiB; weights and context "
                f"{self.in_use_bytes / GIB:.1f} GiB, peak activations {self.activation_bytes / GIB:.2f} GiB, "
                f"decode graphs {self.graph_bytes / GIB:.2f} GiB, "
                f"KV cache {max(self.kv_budget_bytes, 0) / GIB:.1f} GiB")


def probe_num_pages(engine: EngineConfig) -> int:
    """Pages of the probe pool: enough for the prefill probe's tokens and one page per decode probe sequence."""
    return max(-(-engine.max_batch_tokens // engine.page_size), engine.max_batch_size)


def prefill_probe(model: ModelConfig, engine: EngineConfig) -> list[ForwardCommand]:
    """One sequence of max_batch_tokens tokens whose last min(max_batch_size, tokens) rows are sampled."""
    num_tokens = engine.max_batch_tokens
    num_outputs = min(engine.max_batch_size, num_tokens)
    outputs = [OutputSpec(index=i, sampling=_PROBE_SAMPLING) for i in range(num_tokens - num_outputs, num_tokens)]
    return [_one_sequence(model, engine, num_tokens, outputs)]


def pieces_probe(model: ModelConfig, engine: EngineConfig, num_tokens: int) -> list[ForwardCommand]:
    """One sequence of num_tokens tokens, no outputs: the activations that piecewise graphs of that many tokens
    keep in their pool (the LM head and sampling run outside them)."""
    return [_one_sequence(model, engine, num_tokens, [])]


def _one_sequence(model: ModelConfig, engine: EngineConfig, num_tokens: int,
                  outputs: list[OutputSpec]) -> ForwardCommand:
    page_size = engine.page_size
    num_pages = -(-num_tokens // page_size)
    return ForwardCommand(token_ids=[0] * num_tokens,
                          positions=[p % model.max_position_embeddings for p in range(num_tokens)],
                          page_ids=list(range(num_pages)), last_page_len=num_tokens - (num_pages - 1) * page_size,
                          outputs=outputs)


def decode_probe(engine: EngineConfig) -> list[ForwardCommand]:
    """max_batch_size sequences of one token each, sequence i in page i, each with a greedy output: the graphs
    capture the LM head and the argmax too (cuda_graphs.py), so their memory counts the logits of every row."""
    return [ForwardCommand(token_ids=[0], positions=[0], page_ids=[i], last_page_len=1,
                           outputs=(OutputSpec(index=0, sampling=SamplingParams()),))
            for i in range(engine.max_batch_size)]

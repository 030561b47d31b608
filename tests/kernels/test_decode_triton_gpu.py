"""kernels.decode_triton on CUDA: the `gpu` tests, run by hand on the GPU machine
(`python -m pytest -m gpu tests/kernels/test_decode_triton_gpu.py`), and GraphStep, the static buffers of a
graph-captured decode step, whose eager half the interpreter tests also run (run_graph_step_case).
Tolerances: see tests/kernels/test_decode_triton.py."""
from __future__ import annotations

import pytest
import torch

import pie_server.kernels.ops as torch_ops
from pie_server.engine.config import RopeConfig
from pie_server.kernels.decode_triton import choose_num_splits, decode_attention, rope_append
from tests.kernels.test_decode_triton import (PAGE_SIZE, reference_decode, run_decode_case, run_rope_case,
                                              unit_roundoff)

_RAGGED_8 = [1024, 1, 16, 17, 500, 2048, 33, 777]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape,kv_lens", [
    ((32, 8, 128), [1024]), ((32, 8, 128), [1024] * 8), ((32, 8, 128), _RAGGED_8),  # Llama-3.1-8B
    ((9, 3, 64), [1024]), ((9, 3, 64), [(37 * i) % 1500 + 1 for i in range(64)]),  # SmolLM2-135M
])
def test_decode_attention_matches_float64_on_cuda(dtype_name: str, shape: tuple, kv_lens: list[int]) -> None:
    num_q_heads, num_kv_heads, head_dim = shape
    splits = [choose_num_splits(len(kv_lens), num_kv_heads), 1, 7]
    for r in run_decode_case(dtype_name, num_q_heads, num_kv_heads, head_dim, kv_lens, splits, "cuda"):
        assert r["into_out"] and r["finite"] and r["excess"] <= 0, r


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
@pytest.mark.parametrize("with_source", [False, True])
def test_rope_append_matches_reference_on_cuda(num_tokens: int, with_source: bool) -> None:
    slots = [(13 * t) % 1000 for t in range(num_tokens)]
    source_rows = None
    if with_source:  # the last quarter pads the batch with copies of row 0
        pad = num_tokens // 4
        slots = slots[:num_tokens - pad] + [slots[0]] * pad
        source_rows = list(range(num_tokens - pad)) + [0] * pad
    r = run_rope_case("bfloat16", 32, 8, 128, slots, source_rows, "cuda", num_pages=64)
    assert r["q_excess"] <= 0 and r["cache_excess"] <= 0, r
    assert r["others_untouched"] and r["kv_columns_untouched"], r


class GraphStep:
    """Static buffers of a graph-captured decode step (by default 8B's attention shape at batch 8):
    write_step() rewrites the metadata, qkv and positions in place; run() is rope_append, decode_attention."""

    def __init__(self, batch: int = 8, num_pages: int = 400, heads: tuple[int, int, int] = (32, 8, 128),
                 device: str = "cuda", num_splits: int | None = None) -> None:
        self.batch, (self.num_q_heads, self.num_kv_heads, self.head_dim) = batch, heads
        self.gen = torch.Generator().manual_seed(11)
        dev = dict(device=device)
        self.kv_cache = torch.randn(num_pages, 2, PAGE_SIZE, self.num_kv_heads, self.head_dim,
                                    generator=self.gen).to(torch.bfloat16).to(**dev)
        self.qkv = torch.zeros(batch, (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim,
                               dtype=torch.bfloat16, **dev)
        q_width, kv_width = self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q, self.k, self.v = (x.view(batch, -1, self.head_dim) for x in (
            self.qkv[:, :q_width], self.qkv[:, q_width:q_width + kv_width], self.qkv[:, q_width + kv_width:]))
        self.cos_sin = torch_ops.rope_cos_sin_cache(RopeConfig(theta=500000.0), self.head_dim, 8192, device)
        self.positions = torch.zeros(batch, dtype=torch.long, **dev)
        self.write_index = torch.zeros(2 * batch, dtype=torch.long, **dev)
        self.source_rows = torch.arange(batch, **dev)
        self.indptr = torch.zeros(batch + 1, dtype=torch.int32, **dev)
        self.page_ids = torch.zeros(num_pages, dtype=torch.int32, **dev)
        self.last_lens = torch.ones(batch, dtype=torch.int32, **dev)
        self.num_splits = num_splits or choose_num_splits(batch, self.num_kv_heads)

    def write_step(self, kv_lens: list[int], num_padding: int = 0) -> None:
        """Sequences of kv_lens tokens (the new one last) on shuffled pages; the last num_padding rows copy row
        0 (same pages and slot, source row 0), as graph-mode padding does."""
        order = torch.randperm(self.page_ids.numel(), generator=self.gen).tolist()
        indptr, page_ids, last_lens, positions, pages_of, slots = [0], [], [], [], [], []
        for kv_len in kv_lens[:self.batch - num_padding]:
            pages_of.append([order.pop() for _ in range(-(-kv_len // PAGE_SIZE))])
            last_lens.append(kv_len - (len(pages_of[-1]) - 1) * PAGE_SIZE)
            slots.append(pages_of[-1][-1] * PAGE_SIZE + last_lens[-1] - 1)
            positions.append(kv_len - 1)
        for values in (pages_of, last_lens, slots, positions):
            values += [values[0]] * num_padding
        for pages in pages_of:
            page_ids += pages
            indptr.append(len(page_ids))
        sources = list(range(self.batch - num_padding)) + [0] * num_padding
        slot_ids = torch.tensor(slots)
        for buffer, values in ((self.indptr, indptr), (self.last_lens, last_lens), (self.positions, positions),
                               (self.write_index, torch.cat([slot_ids // PAGE_SIZE, slot_ids % PAGE_SIZE])),
                               (self.source_rows, sources)):
            buffer.copy_(torch.as_tensor(values, dtype=buffer.dtype))
        self.page_ids[:len(page_ids)] = torch.tensor(page_ids, dtype=torch.int32)
        self.qkv.copy_(torch.randn(self.qkv.shape, generator=self.gen).to(torch.bfloat16))

    def run(self) -> torch.Tensor:
        rope_append(self.q, self.k, self.v, self.positions, self.cos_sin, self.kv_cache, self.write_index,
                    self.source_rows)
        return self.decode()

    def decode(self) -> torch.Tensor:
        return decode_attention(self.q, self.kv_cache, self.indptr, self.page_ids, self.last_lens, self.num_splits)

    def excess(self, out: torch.Tensor) -> float:
        """out's worst excess over the tolerance against the float64 reference on the current state."""
        ref, mag = reference_decode(self.q, self.kv_cache, self.indptr, self.page_ids, self.last_lens)
        bound = 2 * unit_roundoff(torch.bfloat16, self.kv_cache.device.type) * mag + 1e-4
        return float(((out.double() - ref).abs() - bound).max())


def run_graph_step_case(device: str = "cpu") -> list[float]:
    """GraphStep's eager path on two steps (the second with a padding row): the excess of each."""
    step = GraphStep(batch=3, num_pages=24, heads=(4, 2, 64), device=device, num_splits=3)
    excesses = []
    for kv_lens, num_padding in (([40, 1, 17], 0), ([16, 100], 1)):
        step.write_step(kv_lens, num_padding)
        excesses.append(step.excess(step.run()))
    return excesses


def _capture(step: GraphStep) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    step.run()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step.run()
    return graph, graph_out


@pytest.mark.gpu
def test_graph_replay_equals_eager_after_metadata_changes() -> None:
    """rope_append + decode_attention captured once, replayed after the metadata buffers changed in place
    (other lengths, pages, padding rows): bit-identical to an eager call on the same state, and correct."""
    step = GraphStep()
    step.write_step([100] * 8)
    graph, graph_out = _capture(step)
    for kv_lens, num_padding in (([1024, 1, 16, 17, 500, 2048, 33, 777], 0), ([5, 300, 1024, 64, 65, 1, 900], 1)):
        step.write_step(kv_lens, num_padding)
        cache_before, qkv_before = step.kv_cache.clone(), step.qkv.clone()
        graph.replay()
        torch.cuda.synchronize()
        replayed = graph_out.clone(), step.kv_cache.clone(), step.qkv.clone()
        step.kv_cache.copy_(cache_before)
        step.qkv.copy_(qkv_before)
        eager = step.run()
        assert torch.equal(replayed[0], eager) and torch.equal(replayed[1], step.kv_cache)
        assert torch.equal(replayed[2], step.qkv) and step.excess(eager) <= 0

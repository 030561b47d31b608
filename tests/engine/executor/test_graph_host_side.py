"""The decode graphs' host side on the CPU (CudaGraphDecoder(host_only=True): planned and staged as on the GPU, no
replay): what a steady pipelined decode step puts into the graph's inputs and the Triton bucket's buffers, padding
rows included. The replay itself: tests/engine/executor/test_gpu_graph_head.py on the GPU."""
from __future__ import annotations

import pytest
import torch

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.executor.cuda_graphs import CudaGraphDecoder, GraphConfig
from pie_server.engine.executor.executor import Executor
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.kernels.flashinfer_attention import AttentionShape

PAGE_SIZE, NUM_PAGES, BUCKET = 4, 40, 8
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8, max_position_embeddings=256)
GREEDY = SamplingParams()


def _host_only_executor() -> Executor:
    executor = Executor(TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=NUM_PAGES, max_batch_size=BUCKET, seed=0))
    executor.decode_graphs = CudaGraphDecoder(
        executor.model, executor.kv.layers, AttentionShape(4, 2, 8, torch.bfloat16), PAGE_SIZE,
        GraphConfig(max_batch_size=BUCKET, max_pages_per_step=NUM_PAGES + BUCKET, buckets=(BUCKET,), head=True),
        host_only=True)
    return executor


def _decodes(num_seqs: int, last_page_len: int, fed: bool) -> Batch:
    """Row b owns pages 3b, 3b+1, 3b+2 and writes slot last_page_len - 1 of its last page."""
    return Batch(forwards=[ForwardCommand([7 + b], [2 * PAGE_SIZE + last_page_len - 1], (3 * b, 3 * b + 1, 3 * b + 2),
                                          last_page_len, (OutputSpec(0, GREEDY),), None, TokenRef(b) if fed else None)
                           for b in range(num_seqs)])


def test_a_steady_step_stages_its_rows_and_pads_with_copies_of_row_0() -> None:
    executor = _host_only_executor()
    executor.submit(_decodes(5, 1, fed=False))
    executor.submit(_decodes(5, 2, fed=True))  # 5 rows in the bucket of 8: 3 padding rows
    graphs = executor.decode_graphs
    assert graphs is not None and graphs.num_replays == 2
    token_ids, positions, feed_src = graphs._inputs.tolist()
    assert token_ids == [7, 8, 9, 10, 11, 7, 7, 7]  # placeholders the feed replaces; padding: row 0's
    assert positions == [2 * PAGE_SIZE + 1] * BUCKET
    assert feed_src == [0, 1, 2, 3, 4, -1, -1, -1]  # each row takes its token from the step before
    attention = graphs._graphs[BUCKET].attention
    write_pages, write_offsets, source_rows = attention._int64.view(3, BUCKET).tolist()
    assert write_pages == [2, 5, 8, 11, 14, 2, 2, 2] and write_offsets == [1] * BUCKET
    assert source_rows == [0, 1, 2, 3, 4, 0, 0, 0]  # the padding rows write row 0's K/V into its slot
    assert attention._indptr.tolist() == [0, 3, 6, 9, 12, 15, 16, 17, 18]
    assert attention._last_lens.tolist() == [2] * 5 + [1] * 3
    assert attention._page_ids[:18].tolist() == list(range(15)) + [2, 2, 2]


def test_a_bad_step_changes_no_buffer() -> None:
    executor = _host_only_executor()
    executor.submit(_decodes(5, 1, fed=False))
    graphs = executor.decode_graphs
    assert graphs is not None
    before = graphs._graphs[BUCKET].attention._int32.clone()
    bad = _decodes(5, 2, fed=False)
    bad.forwards[3] = ForwardCommand([7], [9], (3, 40, 5), 2, (OutputSpec(0, GREEDY),))  # page 40 out of range
    with pytest.raises(ValueError, match="forward command 3: page id 40"):
        executor.submit(bad)
    assert torch.equal(graphs._graphs[BUCKET].attention._int32, before) and graphs.num_replays == 1

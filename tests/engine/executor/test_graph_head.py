"""The executor's side of decode graphs with the head (engine/executor/executor.py, `_launch_in_graph`), on the CPU:
a stand-in for CudaGraphDecoder computes what a replay computes (hidden states, logits of every row, their argmax
in a token buffer of its own, fed tokens taken from that buffer by `feed_src`), eagerly. The real graphs are
checked on the GPU machine (test_gpu_graph_head.py); here, which rows the executor takes from them and when it
feeds inside the replay."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.executor.cuda_graphs import GraphConfig, GraphStep
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.kernels.attention import AttentionStep

PAGE_SIZE = 4
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


class EagerHeadGraphs:
    """CudaGraphDecoder's contract with the head, run eagerly on the executor's own model and pool."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.config = GraphConfig(max_batch_size=8, max_pages_per_step=64, head=True)
        self._tokens = torch.zeros(8, dtype=torch.long)
        self.calls: list[tuple[bool, bool]] = []  # per replay: (feed_src given, fed given)

    def supports(self, step: AttentionStep) -> bool:
        return step.num_tokens == step.num_seqs and not step.has_custom_mask

    def forward(self, token_ids: np.ndarray, positions: np.ndarray, step: AttentionStep,
                fed: tuple[torch.Tensor, torch.Tensor] | None = None,
                feed_src: np.ndarray | None = None) -> GraphStep:
        self.calls.append((feed_src is not None, fed is not None))
        ids = torch.from_numpy(np.array(token_ids, np.int64))
        if fed is not None:
            ids.index_copy_(0, *fed)
        if feed_src is not None:
            src = torch.from_numpy(np.asarray(feed_src, np.int64))
            ids = torch.where(src >= 0, self._tokens.index_select(0, src.clamp(min=0)), ids)
        executor = self.executor
        executor.attention.plan(step)
        hidden = executor.model.forward(ids, torch.from_numpy(np.array(positions, np.int64)), executor.attention,
                                        executor.kv.layers)
        logits = executor.model.logits(hidden)
        num_seqs = len(token_ids)
        self._tokens[:num_seqs] = logits.argmax(-1)
        return GraphStep(hidden, logits, self._tokens[:num_seqs])

    def holds(self, tokens: torch.Tensor) -> bool:
        return tokens.data_ptr() == self._tokens.data_ptr() and tokens.dim() == 1


def _executors() -> tuple[Executor, Executor, EagerHeadGraphs]:
    """A plain executor and one with the stand-in graphs, same weights (same seed)."""
    plain = Executor(TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=32, seed=3))
    headed = Executor(TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=32, seed=3))
    graphs = EagerHeadGraphs(headed)
    headed.decode_graphs = graphs
    return plain, headed, graphs


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_pipelined_decode_through_the_head_equals_the_plain_executor(sampling: SamplingParams) -> None:
    plain, headed, graphs = _executors()
    want = DirectGenerator(plain).generate(PROMPTS, 10, sampling, pipelined=True)
    got = DirectGenerator(headed).generate(PROMPTS, 10, sampling, pipelined=True)
    assert got == want
    # The first decode step takes host tokens; after a greedy replay the next one feeds inside it, after a
    # sampled one (tokens from the sampler, not the buffer) through the executor's gather.
    in_graph = sampling is GREEDY
    assert graphs.calls == [(False, False)] + [(in_graph, not in_graph)] * 8


def _decode(tokens: list[int], position: int, pages: list[int], outputs: list[OutputSpec],
            fed: TokenRef | None = None) -> ForwardCommand:
    end = position + len(tokens)
    return ForwardCommand(token_ids=tokens, positions=list(range(position, end)), page_ids=pages,
                          last_page_len=end - (len(pages) - 1) * PAGE_SIZE, outputs=outputs, fed_token=fed)


def _steps() -> list[Batch]:
    """Two prompts' prefill, then a decode step whose commands want 0, 2 and 1 outputs (a sample and a
    distribution of one row), then one fed from it."""
    first = Batch(forwards=[_decode([1, 2, 3], 0, [0], [OutputSpec(2, GREEDY)]),
                            _decode([4, 5], 0, [1], [OutputSpec(1, GREEDY)]),
                            _decode([6], 0, [2], [OutputSpec(0, GREEDY)])])
    mixed = Batch(forwards=[_decode([7], 3, [0], []),
                            _decode([8], 2, [1], [OutputSpec(0, GREEDY), OutputSpec(0, distribution_top_k=3)]),
                            _decode([9], 1, [2], [OutputSpec(0, SAMPLED)])])
    fed = Batch(forwards=[_decode([0], 3, [1], [OutputSpec(0, GREEDY)], TokenRef(1, 0)),
                          _decode([0], 2, [2], [OutputSpec(0, GREEDY)], TokenRef(2, 0))])
    return [first, mixed, fed]


def test_steps_with_some_rows_or_other_outputs_take_the_heads_logits() -> None:
    plain, headed, graphs = _executors()
    results = []
    for executor in (plain, headed):
        pending = [executor.submit(batch) for batch in _steps()]
        results.append([p.result() for p in pending])
    assert results[1] == results[0]
    # The prefill is no replay; the mixed-output step samples the head's logits (its tokens are the sampler's,
    # so the step after it is fed through the executor's gather).
    assert graphs.calls == [(False, False), (False, True)]

"""Decode graphs with the head (engine/executor/cuda_graphs.py): the LM head and the greedy argmax inside the
graph, fed tokens taken from the last replay's token buffer. Against the same steps without pipelining (host
tokens) and against graphs without the head (PIE_GRAPH_HEAD=0). GPU machine only (`pytest -m gpu`)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef
from tests.engine.executor.test_gpu_executor import PAGE_SIZE, _assert_same_tokens, _executor, _prompts, hf_model

__all__ = ["hf_model"]  # the fixture, shared with test_gpu_executor.py

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=50, seed=5)
# Decode steps of the first prompts, then a step with a late prompt's prefill beside them (a piecewise step,
# not a graph), then decode steps of all: the feed crosses graph -> graph, graph -> mixed, mixed -> graph.
LATE_AT, NUM_STEPS = 2, 6


def _drive(executor: Any, sampling: SamplingParams, pipelined: bool) -> tuple[list[list[int]], list[tuple]]:
    """Runs the schedule; returns every sequence's tokens and, per graph replay, (feed_src given, fed given)."""
    from pie_server.engine.executor.direct import DirectGenerator
    graphs = executor.decode_graphs
    calls: list[tuple] = []
    replay = graphs.forward

    def recording(token_ids, positions, step, fed=None, feed_src=None):  # type: ignore[no-untyped-def]
        calls.append((feed_src is not None, fed is not None))
        return replay(token_ids, positions, step, fed, feed_src)

    graphs.forward = recording
    prompts = _prompts()
    gen = DirectGenerator(executor, scatter_pages=True)
    seqs = [gen.start(p) for p in prompts[:-1]]
    gen.step(seqs, sampling)  # the prefill, lockstep
    late = gen.start(prompts[-1])
    pending, pending_seqs, fed_rows = None, [], {}
    for k in range(NUM_STEPS):
        step_seqs = seqs + [late] if k >= LATE_AT else seqs
        commands, rows = [], {}
        for b, seq in enumerate(step_seqs):
            fed_row = fed_rows.get(id(seq))
            ids = [0] if fed_row is not None else seq.token_ids[seq.num_cached:]
            end = seq.num_cached + len(ids)
            gen._reserve(seq, end)
            commands.append(ForwardCommand(
                token_ids=ids, positions=list(range(seq.num_cached, end)), page_ids=list(seq.page_ids),
                last_page_len=end - (len(seq.page_ids) - 1) * PAGE_SIZE,
                outputs=[OutputSpec(index=len(ids) - 1, sampling=sampling)],
                fed_token=None if fed_row is None else TokenRef(fed_row)))
            seq.num_cached, rows[id(seq)] = end, b
        submitted = executor.submit(Batch(forwards=commands))
        if not pipelined:
            _collect(step_seqs, submitted)
            continue
        if pending is not None:
            _collect(pending_seqs, pending)
        pending, pending_seqs, fed_rows = submitted, step_seqs, rows
    if pending is not None:
        _collect(pending_seqs, pending)
    del graphs.forward
    return [s.output_ids for s in seqs + [late]], calls


def _collect(seqs: list, pending: Any) -> None:
    for seq, result in zip(seqs, pending.result().results):
        seq.token_ids.append(result.outputs[0].token_id)


@pytest.mark.gpu
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_fed_tokens_inside_the_graph_equal_host_tokens(hf_model: torch.nn.Module, sampling: SamplingParams) -> None:
    """Pipelined (graph steps take their fed tokens inside the replay when the last step was a greedy replay,
    else through the executor's gather) gives exactly the tokens of the same steps fed from the host."""
    executor = _executor(hf_model)
    assert executor.decode_graphs.config.head
    pipelined, calls = _drive(executor, sampling, pipelined=True)
    lockstep, lockstep_calls = _drive(_executor(hf_model), sampling, pipelined=False)
    assert pipelined == lockstep
    assert [len(out) for out in pipelined] == [NUM_STEPS + 1] * 4 + [NUM_STEPS - LATE_AT]
    assert lockstep_calls == [(False, False)] * (NUM_STEPS - 1)  # the mixed step is no replay
    in_graph = sampling is GREEDY  # only greedy replays leave their tokens in the graph's buffer
    assert calls == [(False, False), (in_graph, not in_graph), (False, True), (in_graph, not in_graph),
                     (in_graph, not in_graph)]


@pytest.mark.gpu
def test_graph_head_gives_the_tokens_and_logits_of_graphs_without_it(hf_model: torch.nn.Module,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with_head, _ = _drive(_executor(hf_model), GREEDY, pipelined=True)
    monkeypatch.setenv("PIE_GRAPH_HEAD", "0")
    without = _executor(hf_model)
    assert not without.decode_graphs.config.head
    plain, calls = _drive(without, GREEDY, pipelined=True)
    assert calls == [(False, False), (False, True), (False, True), (False, True), (False, True)]
    prompts = _prompts()
    for prompt, got, want in zip(prompts, with_head, plain):
        _assert_same_tokens(hf_model, prompt, got, want)

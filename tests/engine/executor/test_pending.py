"""Pipelined steps: submit() before the previous step's tokens reach the host, tokens fed on the device."""
from __future__ import annotations

import pytest
import torch

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.step import Batch, ForwardCommand, OutputResult, OutputSpec, SamplingParams, TokenRef
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.pending import PendingStep
from pie_server.engine.executor.sampler import greedy_outputs

PAGE_SIZE = 4
GREEDY = SamplingParams()
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


def _executor() -> Executor:
    return Executor(TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=32, seed=3))


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_pipelined_generation_equals_lockstep(sampling: SamplingParams) -> None:
    lockstep = DirectGenerator(_executor()).generate(PROMPTS, 12, sampling)
    pipelined = DirectGenerator(_executor()).generate(PROMPTS, 12, sampling, pipelined=True)
    assert pipelined == lockstep
    assert all(len(out) == 12 for out in pipelined)


def _command(tokens: list[int], start: int, pages: list[int], outputs: list[OutputSpec],
             fed: TokenRef | None = None) -> ForwardCommand:
    end = start + len(tokens)
    return ForwardCommand(token_ids=tokens, positions=list(range(start, end)), page_ids=pages,
                          last_page_len=end - (len(pages) - 1) * PAGE_SIZE, outputs=outputs, fed_token=fed)


def _first_step() -> Batch:
    """Command 0 asks for a distribution, command 1 samples a token."""
    return Batch(forwards=[
        _command([1, 2, 3], 0, [0], [OutputSpec(index=2, distribution_top_k=3)]),
        _command([7, 8], 0, [1], [OutputSpec(index=1, sampling=GREEDY)])])


def test_fed_token_is_the_sampled_token() -> None:
    executor = _executor()
    pending = executor.submit(_first_step())
    fed = executor.submit(Batch(forwards=[_command([0], 2, [1], [OutputSpec(0, GREEDY)], TokenRef(1))]))
    sampled = pending.result().results[1].outputs[0].token_id
    assert pending.result() is pending.result() and pending.is_ready()
    reference = _executor()
    reference.execute(_first_step())
    explicit = reference.execute(Batch(forwards=[_command([sampled], 2, [1], [OutputSpec(0, GREEDY)])]))
    assert fed.result().results == explicit.results


@pytest.mark.parametrize("ref, message", [(TokenRef(0), "distribution"), (TokenRef(2), "2 commands"),
                                          (TokenRef(1, 1), "had 1 outputs")])
def test_bad_reference_raises_and_changes_nothing(ref: TokenRef, message: str) -> None:
    executor = _executor()
    executor.execute(_first_step())
    before = [layer.clone() for layer in executor.kv.layers]
    with pytest.raises(ValueError, match=message):
        executor.submit(Batch(forwards=[_command([0], 2, [1], [OutputSpec(0, GREEDY)], ref)]))
    assert all(torch.equal(a, b) for a, b in zip(before, executor.kv.layers))
    # The failed batch was never submitted: the step before it can still be referenced.
    executor.execute(Batch(forwards=[_command([0], 2, [1], [OutputSpec(0, GREEDY)], TokenRef(1))]))


def test_reference_needs_a_previous_sampling_step() -> None:
    executor = _executor()
    with pytest.raises(ValueError, match="previous step"):
        executor.submit(Batch(forwards=[_command([0], 0, [0], [OutputSpec(0, GREEDY)], TokenRef(0))]))
    executor.execute(Batch(forwards=[_command([1, 2], 0, [0], [])]))  # no outputs: nothing to reference
    with pytest.raises(ValueError, match="previous step"):
        executor.submit(Batch(forwards=[_command([0], 2, [0], [OutputSpec(0, GREEDY)], TokenRef(0))]))


def test_token_ref_rejects_negative_indices() -> None:
    with pytest.raises(ValueError):
        TokenRef(-1)


def test_pipelined_decode_needs_one_uncached_token() -> None:
    generator = DirectGenerator(_executor())
    seq = generator.start([1, 2, 3])
    with pytest.raises(ValueError, match="one uncached token"):
        generator.decode_pipelined([seq], GREEDY, 2)


@pytest.mark.parametrize("counts", [[1, 1, 1], [2, 0, 1], [0, 3, 0], [1, 2], []])
def test_a_steps_outputs_split_into_their_commands_in_order(counts: list[int]) -> None:
    outputs = [OutputResult(token_id=t) for t in range(sum(counts))]
    done = PendingStep(7, greedy_outputs(torch.arange(sum(counts))), counts, 0.0).result()
    assert all(isinstance(r.outputs, tuple) for r in done.results) and done.step_id == 7
    assert [list(r.outputs) for r in done.results] == \
        [outputs[sum(counts[:b]):sum(counts[:b + 1])] for b in range(len(counts))]

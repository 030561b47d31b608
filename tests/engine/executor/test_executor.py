"""Executor behaviour beyond plain forwards: custom masks, page copies, swaps, validation, pool sizing."""
from __future__ import annotations

import pytest
import torch

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, PageCopy, PageSwap, SamplingParams
from pie_server.engine.executor.executor import Executor

PAGE_SIZE = 4
GREEDY = SamplingParams()
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.fixture
def executor() -> Executor:
    return Executor(TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=16, seed=3))


def _prefill(tokens: list[int], pages: list[int], positions: list[int] | None = None,
             mask: list[list[bool]] | None = None) -> ForwardCommand:
    n = len(tokens)
    return ForwardCommand(token_ids=tokens, positions=positions or list(range(n)), page_ids=pages,
                          last_page_len=n - (len(pages) - 1) * PAGE_SIZE,
                          outputs=[OutputSpec(index=n - 1, sampling=GREEDY)], attention_mask=mask)


def _snapshot(executor: Executor) -> list[torch.Tensor]:
    return [layer.clone() for layer in executor.kv.layers]


def test_causal_custom_mask_equals_no_mask(executor: Executor) -> None:
    tokens = [5, 9, 2, 7, 11, 3]
    causal = [[j <= i for j in range(6)] for i in range(6)]
    plain = executor.logits(Batch(forwards=[_prefill(tokens, [3, 8])]))
    masked = executor.logits(Batch(forwards=[_prefill(tokens, [3, 8], mask=causal)]))
    torch.testing.assert_close(plain, masked)


def test_hidden_slot_equals_a_sequence_without_that_token(executor: Executor) -> None:
    tokens = [5, 9, 2, 7]
    hide_slot_1 = [[j <= i and j != 1 for j in range(4)] for i in range(4)]
    hide_slot_1[1][1] = True  # the hidden token itself still needs one visible slot
    masked = executor.logits(Batch(forwards=[_prefill(tokens, [0], mask=hide_slot_1)]))
    without = executor.logits(Batch(forwards=[_prefill([5, 2, 7], [1], positions=[0, 2, 3])]))
    torch.testing.assert_close(masked, without, atol=1e-5, rtol=1e-5)


def test_decode_from_copied_pages_equals_original(executor: Executor) -> None:
    tokens = [1, 2, 3, 4, 5, 6]
    executor.execute(Batch(forwards=[_prefill(tokens, [2, 9])]))
    decode = dict(token_ids=[7], positions=[6], last_page_len=3, outputs=[OutputSpec(index=0, sampling=GREEDY)])
    # Copy the full page whole and the partial page's 2 filled slots, then decode in both places.
    copies = [PageCopy(src_page_id=2, dst_page_id=12), PageCopy(src_page_id=9, dst_page_id=13, num_slots=2)]
    executor.execute(Batch(page_copies=copies))
    original = executor.logits(Batch(forwards=[ForwardCommand(page_ids=[2, 9], **decode)]))
    copied = executor.logits(Batch(forwards=[ForwardCommand(page_ids=[12, 13], **decode)]))
    torch.testing.assert_close(original, copied)


def test_swap_out_and_in_to_other_pages_keeps_the_context(executor: Executor) -> None:
    tokens = [4, 8, 15, 16, 23]
    executor.execute(Batch(forwards=[_prefill(tokens, [0, 1])]))
    decode = dict(token_ids=[42], positions=[5], last_page_len=2, outputs=[OutputSpec(index=0, sampling=GREEDY)])
    expected = executor.logits(Batch(forwards=[ForwardCommand(page_ids=[0, 1], **decode)]))
    executor.execute(Batch(swap_outs=[PageSwap(0, 0), PageSwap(1, 1)]))
    executor.execute(Batch(forwards=[_prefill([9] * 8, [0, 1])]))  # another sequence takes the pages
    executor.execute(Batch(swap_ins=[PageSwap(5, 0), PageSwap(6, 1)]))
    got = executor.logits(Batch(forwards=[ForwardCommand(page_ids=[5, 6], **decode)]))
    torch.testing.assert_close(expected, got)


def test_greedy_execute_returns_argmax(executor: Executor) -> None:
    command = _prefill([3, 1, 4, 1, 5], [7, 4])
    logits = executor.logits(Batch(forwards=[command]))
    result = executor.execute(Batch(forwards=[command], step_id=11))
    assert result.step_id == 11
    assert result.results[0].outputs[0].token_id == int(logits[0].argmax())


BAD_BATCHES = {
    "page out of range": Batch(forwards=[_prefill([1, 2], [16])]),
    "token out of range": Batch(forwards=[_prefill([1, 64], [0])]),
    "position out of range": Batch(forwards=[_prefill([1, 2], [0], positions=[0, 64])]),
    "duplicate pages": Batch(forwards=[_prefill([1] * 5, [0, 0])]),
    "same slot twice": Batch(forwards=[_prefill([1, 2], [0]), _prefill([3, 4], [0])]),
    "tokens exceed context": Batch(forwards=[ForwardCommand(token_ids=[1, 2, 3], positions=[0, 1, 2],
                                                            page_ids=[0], last_page_len=2)]),
    "output index": Batch(forwards=[ForwardCommand(token_ids=[1], positions=[0], page_ids=[0], last_page_len=1,
                                                   outputs=[OutputSpec(index=1, sampling=GREEDY)])]),
    "mask shape": Batch(forwards=[_prefill([1, 2], [0], mask=[[True]])]),
    "copy out of range": Batch(forwards=[_prefill([1, 2], [0])],
                               page_copies=[PageCopy(1, 2, src_offset=3, num_slots=2)]),
    "swap slot out of range": Batch(forwards=[_prefill([1, 2], [0])], swap_outs=[PageSwap(1, 10 ** 6)]),
    "empty tokens": Batch(forwards=[ForwardCommand(token_ids=[], positions=[], page_ids=[0], last_page_len=1)]),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_invalid_batch_raises_and_changes_nothing(executor: Executor, name: str) -> None:
    executor.execute(Batch(forwards=[_prefill([1, 2, 3, 4, 5], [1, 2])]))
    before = _snapshot(executor)
    with pytest.raises(ValueError):
        executor.execute(BAD_BATCHES[name])
    for layer_before, layer_after in zip(before, executor.kv.layers):
        assert torch.equal(layer_before, layer_after)


def test_pool_is_sized_from_memory_when_not_given() -> None:
    config = EngineConfig(page_size=PAGE_SIZE, max_cpu_kv_bytes=1 << 20)
    executor = Executor(TINY, config)
    per_page = 2 * 2 * PAGE_SIZE * 2 * 8 * 4  # layers * (K,V) * slots * kv heads * head_dim * fp32
    assert executor.info.kv_bytes_per_page == per_page
    assert executor.info.num_pages == (1 << 20) // per_page
    assert executor.info.max_context_len == min(64, executor.info.num_pages * PAGE_SIZE)

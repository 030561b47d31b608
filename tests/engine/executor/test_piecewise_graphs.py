"""engine/executor/piecewise_graphs.py on CPU, pieces run without graphs (capture=False): a step run as pieces
(padded to its bucket, attention eager between them) gives the regular forward's hidden states and writes the
same K/V, whatever earlier, larger steps left in the padding rows. The captured graphs are checked against the
eager forward on the GPU (tests/engine/executor/test_gpu_executor.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pie_server.engine.config import ModelConfig
from pie_server.engine.executor.piecewise_graphs import PiecewiseConfig, PiecewiseGraphs
from pie_server.engine.model.llama import LlamaModel
from pie_server.kernels.attention import AttentionStep, TorchAttention

PAGE_SIZE = 4
NUM_PAGES = 12
BUCKETS = (4, 8, 16)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8, qkv_bias=True)
    model = LlamaModel.random(cfg, torch.device("cpu"), torch.float32, seed=5)
    with torch.no_grad():  # norms of ones would hide a norm applied to the wrong rows
        for layer in model.layers:
            layer.input_norm.add_(torch.rand_like(layer.input_norm))
            layer.qkv_bias.copy_(torch.randn_like(layer.qkv_bias) * 0.1)
    return model


def _caches(model: LlamaModel) -> list[torch.Tensor]:
    cfg = model.config
    return [torch.zeros(NUM_PAGES, 2, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]


def _step(sequences: list[tuple[list[int], int]]) -> tuple[AttentionStep, np.ndarray]:
    """sequences: (pages, kv_len after the step, new tokens = the last ones) -> the step and the positions."""
    qo, page_indptr, page_ids, last_lens, slots, positions = [0], [0], [], [], [], []
    for pages, kv_len, num_new in sequences:
        qo.append(qo[-1] + num_new)
        page_ids += pages
        page_indptr.append(len(page_ids))
        last_lens.append((kv_len - 1) % PAGE_SIZE + 1)
        for p in range(kv_len - num_new, kv_len):
            positions.append(p)
            slots.append(pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE)
    step = AttentionStep(page_size=PAGE_SIZE, qo_indptr=qo, kv_page_indptr=page_indptr, kv_page_ids=page_ids,
                         kv_last_page_lens=last_lens, slot_ids=slots)
    return step, np.asarray(positions, dtype=np.int64)


def _eager(model: LlamaModel, token_ids: np.ndarray, positions: np.ndarray, step: AttentionStep,
           caches: list[torch.Tensor]) -> torch.Tensor:
    attention = TorchAttention()
    attention.plan(step)
    return model.forward(torch.from_numpy(token_ids), torch.from_numpy(positions), attention, caches)


def _runner(model: LlamaModel, caches: list[torch.Tensor]) -> PiecewiseGraphs:
    return PiecewiseGraphs.for_model(model, caches, PiecewiseConfig(BUCKETS, capture=False))


def test_steps_as_pieces_equal_the_regular_forward(model: LlamaModel) -> None:
    pieces_caches, eager_caches = _caches(model), _caches(model)
    runner = _runner(model, pieces_caches)
    rng = np.random.default_rng(0)
    # A 13-token prompt (bucket 16), then a mixed step: 3 new tokens of sequence 0 beside a 2-token sequence
    # (bucket 8: rows 5..7 still hold the first step's values), then one of 4 tokens (bucket 4, exactly full).
    steps = [[([0, 1, 2, 3], 13, 13)], [([0, 1, 2, 3], 16, 3), ([5], 2, 2)], [([5, 6], 6, 4)]]
    for sequences in steps:
        step, positions = _step(sequences)
        token_ids = rng.integers(0, model.config.vocab_size, len(positions))
        want = _eager(model, token_ids, positions, step, eager_caches)
        got = runner.forward(token_ids, positions, step, TorchAttention())
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(pieces_caches, eager_caches))
    assert runner.num_replays == len(steps)
    untouched = [p for p in range(NUM_PAGES) if p not in (0, 1, 2, 3, 5, 6)]
    assert all(not cache[untouched].any() for cache in pieces_caches), "padding rows wrote K/V"


def test_fed_tokens_replace_their_rows(model: LlamaModel) -> None:
    pieces_caches, eager_caches = _caches(model), _caches(model)
    runner = _runner(model, pieces_caches)
    step, positions = _step([([0, 1], 6, 6)])
    token_ids = np.arange(10, 16, dtype=np.int64)
    fed_ids = token_ids.copy()
    fed_ids[[2, 5]] = [40, 41]
    want = _eager(model, fed_ids, positions, step, eager_caches)
    got = runner.forward(token_ids, positions, step, TorchAttention(),
                         fed=(torch.tensor([2, 5]), torch.tensor([40, 41])))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_buckets_and_what_the_runner_takes(model: LlamaModel) -> None:
    runner = _runner(model, _caches(model))
    assert [runner.bucket(n) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
    with pytest.raises(ValueError, match="exceed"):
        runner.bucket(17)
    step, positions = _step([([0, 1, 2, 3, 4], 17, 17)])
    assert not runner.supports(step)
    with pytest.raises(ValueError, match="not one this runner takes"):
        runner.forward(np.zeros(17, np.int64), positions, step, TorchAttention())
    step, positions = _step([([0], 3, 3)])
    with pytest.raises(ValueError, match="not one this runner takes"):  # ids disagree with the step
        runner.forward(np.zeros(2, np.int64), positions[:2], step, TorchAttention())


def test_config_validation_and_step_budget() -> None:
    for bad in [(), (0, 4), (8, 4), (4, 4)]:
        with pytest.raises(ValueError, match="buckets"):
            PiecewiseConfig(bad)
    assert PiecewiseConfig.for_step_budget(4096).buckets == (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert PiecewiseConfig.for_step_budget(100).buckets == (16, 32, 48, 64, 96, 100)
    assert PiecewiseConfig.for_step_budget(8).buckets == (8,)
    # --piecewise-max-tokens: capture stops there, or at the step budget if that is smaller
    assert PiecewiseConfig.for_step_budget(4096, 2048).buckets[-5:] == (512, 768, 1024, 1536, 2048)
    assert PiecewiseConfig.for_step_budget(1200, 2048).buckets[-3:] == (768, 1024, 1200)
    assert PiecewiseConfig.for_step_budget(4096, 40).buckets == (16, 32, 40)

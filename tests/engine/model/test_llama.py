"""engine.model.llama on CPU: the fused one-row forward of graph mode equals the regular forward (torch
reference kernels, float32), with every bias the decoder supports.

The GPU side (fused Triton GEMVs inside CUDA graphs) is checked against transformers in
tests/engine/executor/test_gpu_executor.py.
"""
from __future__ import annotations

import pytest
import torch

from pie_server.engine.config import ModelConfig
from pie_server.engine.model.llama import LlamaModel
from pie_server.kernels.attention import AttentionStep, TorchAttention

PAGE_SIZE = 4
PROMPT_LEN = 6


def _model(biases: bool) -> LlamaModel:
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, qkv_bias=biases, o_bias=biases, mlp_bias=biases)
    model = LlamaModel.random(cfg, torch.device("cpu"), torch.float32, seed=3)
    with torch.no_grad():  # norms of ones and zero biases would hide a misplaced weight
        for layer in model.layers:
            for norm in (layer.input_norm, layer.post_norm):
                norm.add_(torch.rand_like(norm))
            for bias in (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias):
                if bias is not None:
                    bias.copy_(torch.randn_like(bias) * 0.1)
    return model


def _step(positions: list[int]) -> AttentionStep:
    """One sequence on pages 1 and 3 (in that order), new tokens at `positions`."""
    kv_len = positions[-1] + 1
    page_ids = [1, 3][:-(-kv_len // PAGE_SIZE)]
    return AttentionStep(page_size=PAGE_SIZE, qo_indptr=[0, len(positions)], kv_page_indptr=[0, len(page_ids)],
                         kv_page_ids=page_ids, kv_last_page_lens=[(kv_len - 1) % PAGE_SIZE + 1],
                         slot_ids=[page_ids[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in positions])


class _CallerAppends(TorchAttention):
    """The reference backend, letting the model write K/V itself (kv_write_index); it then calls attend()."""

    def plan(self, step: AttentionStep) -> None:
        super().plan(step)
        slots = torch.tensor(list(step.slot_ids))
        self._write_index = torch.cat([slots // step.page_size, slots % step.page_size])

    def kv_write_index(self) -> torch.Tensor:
        return self._write_index



def _forward(model: LlamaModel, token_ids: list[int], positions: list[int], caches: list[torch.Tensor],
             fused: bool | None, attention: TorchAttention | None = None) -> torch.Tensor:
    attention = attention or TorchAttention()
    attention.plan(_step(positions))
    ids, pos = torch.tensor(token_ids), torch.tensor(positions)
    if fused is None:
        return model.forward(ids, pos, attention, caches)
    with model.graph_mode(fuse_one_row=fused):
        return model.forward(ids, pos, attention, caches)


@pytest.mark.parametrize("caller_appends", [False, True], ids=["backend-appends", "qkv-appends"])
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "biases"])
def test_fused_one_row_forward_equals_the_regular_forward(biases: bool, caller_appends: bool) -> None:
    model = _model(biases)
    cfg = model.config
    caches = [torch.zeros(4, 2, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    _forward(model, list(range(7, 7 + PROMPT_LEN)), list(range(PROMPT_LEN)), caches, None)  # prefill
    regular_caches = [c.clone() for c in caches]
    want = _forward(model, [11], [PROMPT_LEN], regular_caches, None)
    got = _forward(model, [11], [PROMPT_LEN], caches, True, _CallerAppends() if caller_appends else None)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(caches, regular_caches))
    assert not model._fuse_one_row and not model._single_row_kernels, "graph_mode() restores the regular path"


def test_graph_mode_without_fusion_takes_the_regular_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(False)
    cfg = model.config
    caches = [torch.zeros(4, 2, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    monkeypatch.setattr(model, "_forward_one_row", lambda *args: pytest.fail("fused path taken"))
    out = _forward(model, [5], [0], caches, fused=False)
    assert out.shape == (1, cfg.hidden_size)

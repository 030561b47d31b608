"""kernels.flashinfer_attention.decode_uses_tensor_cores: which decode kernels FlashInfer runs (the measured
rule; CPU, no FlashInfer needed)."""
from __future__ import annotations

import pytest
import torch

from pie_server.kernels.flashinfer_attention import AttentionShape, decode_uses_tensor_cores

LLAMA_8B = AttentionShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
SMOLLM2 = AttentionShape(num_qo_heads=9, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)


def test_tensor_cores_under_graphs_for_groups_of_four_or_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIE_FI_DECODE_TENSOR_CORES", raising=False)
    assert decode_uses_tensor_cores(LLAMA_8B, graph_mode=True)
    assert not decode_uses_tensor_cores(LLAMA_8B, graph_mode=False)  # eager planning got dearer
    assert not decode_uses_tensor_cores(SMOLLM2, graph_mode=True)
    assert not decode_uses_tensor_cores(None, graph_mode=True)


def test_environment_forces_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_FI_DECODE_TENSOR_CORES", "0")
    assert not decode_uses_tensor_cores(LLAMA_8B, graph_mode=True)
    monkeypatch.setenv("PIE_FI_DECODE_TENSOR_CORES", "1")
    assert decode_uses_tensor_cores(SMOLLM2, graph_mode=False)

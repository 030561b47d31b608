"""Pipelined steps on the GPU (the CUDA executor's submit() and fed tokens under the Controller): decodes give
exactly the tokens of unpipelined steps. Both controllers are stepped by hand with the same decodes queued, so
every step has the same rows in both runs (bf16 results of a row may depend on the batch's size)."""
from __future__ import annotations

import pytest

from pie_server.engine.config import EngineConfig, ModelConfig, RopeConfig
from pie_server.engine.control.config import ControlConfig
from tests.engine.control.decodes import decode_all

PAGE_SIZE = 16
PROMPT_LENS = (5, 37, 100, 16)
MAX_NEW = (40, 25, 33, 17)  # ends at different steps, none by a stop token (which pipelined wastes a row on)


def _decode_all(executor, pipeline: bool, depth: int = 1) -> list[list[int]]:  # type: ignore[no-untyped-def]
    import torch

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1024, (length,), generator=gen).tolist() for length in PROMPT_LENS]
    config = ControlConfig(pipeline=pipeline, speculation_depth=depth, vocab_size=1024, max_position=2048)
    return decode_all(executor, config, prompts, MAX_NEW, PAGE_SIZE)


@pytest.mark.gpu
def test_pipelined_decodes_equal_serial_ones_on_cuda() -> None:
    import torch

    from pie_server.engine.executor.executor import Executor
    from pie_server.engine.model.llama import random_weights

    model = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                        num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=2048,
                        rope=RopeConfig(theta=500000.0), dtype="bfloat16")
    engine = EngineConfig(device="cuda", dtype="bfloat16", num_pages=128, page_size=PAGE_SIZE, max_batch_size=8)
    executor = Executor(model, engine, random_weights(model, torch.device("cuda"), torch.bfloat16, seed=0))
    serial = _decode_all(executor, pipeline=False)
    pipelined = _decode_all(executor, pipeline=True)
    assert [len(t) for t in pipelined] == list(MAX_NEW)
    assert pipelined == serial
    assert _decode_all(executor, pipeline=True, depth=2) == serial  # two steps ahead (speculation_depth 2)

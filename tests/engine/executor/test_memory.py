"""KV pool sizing on a GPU (engine/executor/memory.py): the plan's arithmetic and the probe steps (CPU)."""
from __future__ import annotations

import pytest

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.step import Batch
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.memory import GIB, MemoryPlan, decode_probe, prefill_probe, probe_num_pages

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def _plan(**overrides) -> MemoryPlan:
    values = dict(total_bytes=80 * GIB, in_use_bytes=17 * GIB, activation_bytes=2 * GIB, graph_bytes=GIB,
                  utilization=0.9)
    return MemoryPlan(**{**values, **overrides})


def test_budget_is_what_the_utilization_leaves() -> None:
    plan = _plan()
    assert plan.kv_budget_bytes == int(0.9 * 80 * GIB) - 20 * GIB
    assert plan.num_pages(2 << 20) == plan.kv_budget_bytes // (2 << 20)
    assert "KV cache 52.0 GiB" in plan.describe()


def test_no_room_for_one_page_says_where_the_memory_went() -> None:
    with pytest.raises(RuntimeError, match="weights and context 17.0 GiB.*--gpu-memory-utilization"):
        _plan(utilization=0.2).num_pages(2 << 20)


@pytest.mark.parametrize("bad", [dict(utilization=0.0), dict(utilization=1.5), dict(graph_bytes=-1)])
def test_plan_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        _plan(**bad)


def test_engine_config_validates_utilization() -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=0.0)


@pytest.mark.parametrize("tokens, seqs", [(100, 8), (16, 40), (200, 300)])
def test_probe_steps_fit_the_probe_pool_and_run(tokens: int, seqs: int) -> None:
    """Positions wrap below max_position_embeddings; every probe is a valid batch for the executor."""
    engine = EngineConfig(page_size=4, max_batch_tokens=tokens, max_batch_size=seqs, seed=1)
    executor = Executor(TINY, EngineConfig(page_size=4, num_pages=probe_num_pages(engine)))
    prefill = prefill_probe(TINY, engine)
    assert len(prefill[0].token_ids) == tokens and max(prefill[0].positions) < TINY.max_position_embeddings
    assert len(prefill[0].outputs) == min(tokens, seqs)
    result = executor.execute(Batch(forwards=prefill))
    assert len(result.results[0].outputs) == min(tokens, seqs)
    decode = decode_probe(engine)
    assert len(decode) == seqs
    assert len(executor.execute(Batch(forwards=decode)).results) == seqs

"""kernels/cpu_linear.py: every way computes F.linear; the measured ways keep the default unless another is
clearly faster, and are measured once per process for the same shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pie_server.kernels import cpu_linear
from pie_server.kernels.cpu_linear import DEFAULT_WAYS, MIN_GAIN, ROUTE_ROWS, WAYS, CpuLinear


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 9])
def test_every_way_is_f_linear(way: str, num_rows: int) -> None:
    torch.manual_seed(num_rows)
    x, weight, bias = torch.randn(num_rows, 64), torch.randn(48, 64), torch.randn(48)
    linear = CpuLinear((way,) * len(ROUTE_ROWS))
    for b in (None, bias):
        out = linear(x, weight, b)
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous()


def test_rows_pick_their_way() -> None:
    linear = CpuLinear(("mkl", "onednn", "transposed"))
    assert [linear.way(n) for n in (1, 2, 3, 4, 5, 300)] == ["mkl", "onednn", "transposed", "transposed", "onednn",
                                                             "onednn"]
    with pytest.raises(ValueError):
        CpuLinear(("mkl",))
    with pytest.raises(ValueError):
        CpuLinear(("fast",) * len(ROUTE_ROWS))


def test_measured_keeps_the_default_unless_another_way_is_clearly_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake timings: at 1 row "mkl" takes a third of the default's time (taken), at 2 rows "onednn" is just under
    MIN_GAIN ahead (the default stays), at 4 rows the default is fastest. Measured once for these shapes."""
    default_s = 1.0
    fake = {(1, "mkl"): default_s / 3, (2, "onednn"): default_s / (MIN_GAIN * 0.95)}
    calls = []

    def pass_s(weights, linear, num_rows, repeats):  # noqa: ANN001, ANN202
        way = linear.way(num_rows)
        calls.append((num_rows, way))
        return fake.get((num_rows, way), default_s if way == DEFAULT_WAYS[ROUTE_ROWS.index(num_rows)] else 2.0)

    monkeypatch.setattr(cpu_linear, "_pass_s", pass_s)
    monkeypatch.setattr(cpu_linear, "_MEASURED", {})
    monkeypatch.setattr(cpu_linear, "MIN_MEASURED_BYTES", 0)
    weights = [torch.zeros(8, 4), torch.zeros(4, 8)]
    chosen = CpuLinear.measured(weights)
    assert chosen.ways == ("mkl", DEFAULT_WAYS[1], DEFAULT_WAYS[2])
    num_calls = len(calls)
    assert CpuLinear.measured([torch.ones(8, 4), torch.ones(4, 8)]) is chosen and len(calls) == num_calls
    CpuLinear.measured([torch.zeros(8, 4)])  # other shapes: measured again
    assert len(calls) > num_calls


def test_small_weights_keep_the_default_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "_pass_s", lambda *args: pytest.fail("measured cache-resident weights"))
    assert CpuLinear.measured([torch.zeros(64, 64)]) == CpuLinear()


def test_a_cpu_float32_executor_runs_the_measured_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_server.engine.config import EngineConfig, ModelConfig
    from pie_server.engine.executor.executor import Executor

    chosen = CpuLinear(("mkl",) * len(ROUTE_ROWS))
    seen = []
    monkeypatch.setattr(CpuLinear, "measured", classmethod(lambda cls, weights: seen.append(weights) or chosen))
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    executor = Executor(config, EngineConfig(num_pages=8, page_size=4, dtype="float32"))
    assert executor.model.linear is chosen and len(seen[0]) == 2 * 4 + 1  # 4 projections a layer, the LM head

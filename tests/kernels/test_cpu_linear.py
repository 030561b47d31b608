"""kernels/cpu_linear.py: every way computes F.linear; the measured ways keep the default unless another is
clearly faster, are measured once per process for the same shapes and recorded for the machine."""
from __future__ import annotations

import json
from pathlib import Path

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


class _FakeTimes:
    """Replaces _pass_s: seconds per pass by (rows, way), the default way 1.0 s, others 2.0 s unless given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fake: dict[tuple[int, str], float]) -> None:
        self.fake, self.calls = fake, []
        monkeypatch.setattr(cpu_linear, "_pass_s", self)
        monkeypatch.setattr(cpu_linear, "_MEASURED", {})
        monkeypatch.setattr(cpu_linear, "MIN_MEASURED_BYTES", 0)

    def __call__(self, weights, linear, inputs):  # noqa: ANN001, ANN204
        num_rows = next(iter(inputs.values())).shape[0]
        way = linear.way(num_rows)
        self.calls.append((num_rows, way))
        return self.fake.get((num_rows, way), 1.0 if way == DEFAULT_WAYS[ROUTE_ROWS.index(num_rows)] else 2.0)


def test_measured_keeps_the_default_unless_another_way_is_clearly_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake timings: at 1 row "mkl" takes a third of the default's time (taken), at 2 rows "onednn" is just under
    MIN_GAIN ahead (the default stays), at 4 rows the default is fastest. Measured once for these shapes."""
    times = _FakeTimes(monkeypatch, {(1, "mkl"): 1 / 3, (2, "onednn"): 1 / (MIN_GAIN * 0.95)})
    weights = [torch.zeros(8, 4), torch.zeros(4, 8)]
    chosen = CpuLinear.measured(weights)
    assert chosen.ways == ("mkl", DEFAULT_WAYS[1], DEFAULT_WAYS[2])
    num_calls = len(times.calls)
    assert CpuLinear.measured([torch.ones(8, 4), torch.ones(4, 8)]) is chosen and len(times.calls) == num_calls
    CpuLinear.measured([torch.zeros(8, 4)])  # other shapes: measured again
    assert len(times.calls) > num_calls


def test_a_choice_is_recorded_for_the_machine_and_taken_by_later_processes(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """The first process measures and writes the record; a later one (its per-process memory empty) takes the
    recorded ways without timing anything, even where its own timings would differ; other shapes are measured
    and added beside the first entry."""
    record = tmp_path / "cache" / cpu_linear.RECORD_NAME
    _FakeTimes(monkeypatch, {(4, "mkl"): 1 / 1.4})
    weights = [torch.zeros(8, 4), torch.zeros(4, 8)]
    chosen = CpuLinear.measured(weights, record=record)
    assert chosen.ways == (DEFAULT_WAYS[0], DEFAULT_WAYS[1], "mkl")
    (entry,) = json.loads(record.read_text()).values()
    assert entry["ways"] == list(chosen.ways) and entry["pass_ms"]["4 rows"]["mkl"] == pytest.approx(1000 / 1.4, abs=0.01)

    later = _FakeTimes(monkeypatch, {})  # a new process, on which the default would now win everywhere
    assert CpuLinear.measured(weights, record=record) == chosen and later.calls == []
    CpuLinear.measured([torch.zeros(8, 4)], record=record)
    assert later.calls and len(json.loads(record.read_text())) == 2


@pytest.mark.parametrize("content", ["not json", '["a list"]', '{"KEY": {"ways": ["fast", "mkl", "mkl"]}}',
                                     '{"KEY": {"ways": 3}}', '{"KEY": "mkl"}'])
def test_a_damaged_record_is_measured_again_and_rewritten(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          content: str) -> None:
    times = _FakeTimes(monkeypatch, {(1, "mkl"): 0.1})
    weights = [torch.zeros(8, 4)]
    record = tmp_path / cpu_linear.RECORD_NAME
    record.write_text(content.replace("KEY", cpu_linear._record_key(weights)))
    assert CpuLinear.measured(weights, record=record).ways[0] == "mkl" and times.calls
    assert list(json.loads(record.read_text()).values())[-1]["ways"][0] == "mkl"


def test_an_unwritable_record_leaves_the_choice_to_the_process(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    _FakeTimes(monkeypatch, {(1, "mkl"): 0.1})
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the record's folder should be
    assert CpuLinear.measured([torch.zeros(8, 4)], record=blocker / "sub" / cpu_linear.RECORD_NAME).ways[0] == "mkl"


def test_small_weights_keep_the_default_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "_pass_s", lambda *args: pytest.fail("measured cache-resident weights"))
    assert CpuLinear.measured([torch.zeros(64, 64)]) == CpuLinear()


def test_a_cpu_float32_executor_runs_the_measured_ways(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pie_server.engine.config import EngineConfig, ModelConfig
    from pie_server.engine.executor.executor import Executor

    chosen = CpuLinear(("mkl",) * len(ROUTE_ROWS))
    seen = []
    monkeypatch.setenv("PIE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(CpuLinear, "measured",
                        classmethod(lambda cls, weights, record: seen.append((weights, record)) or chosen))
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    executor = Executor(config, EngineConfig(num_pages=8, page_size=4, dtype="float32"))
    assert executor.model.linear is chosen and len(seen[0][0]) == 2 * 4 + 1  # 4 projections a layer, the LM head
    assert seen[0][1] == tmp_path / cpu_linear.RECORD_NAME  # under the cache root

"""The engine's choices by device: where the host-side generate decodes (docs/decisions/decoding-in-control.md),
whether steps are pipelined (docs/decisions/pipelined-steps.md) and which thread loads a CPU model."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pie_server.engine.config import EngineConfig
from pie_server.engine.control.config import ControlConfig
from pie_server.engine import engine as engine_module
from pie_server.engine.engine import with_decode_choice
from pie_server.engine.runtime.config import RuntimeConfig


def test_decoding_in_control_unless_the_runtime_config_or_the_environment_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIE_DECODE_IN_CONTROL", raising=False)
    assert with_decode_choice(RuntimeConfig()).decode_in_control is True
    assert with_decode_choice(RuntimeConfig(decode_in_control=False)).decode_in_control is False
    monkeypatch.setenv("PIE_DECODE_IN_CONTROL", "1")
    assert with_decode_choice(RuntimeConfig(decode_in_control=False)).decode_in_control
    monkeypatch.setenv("PIE_DECODE_IN_CONTROL", "0")
    assert with_decode_choice(RuntimeConfig()).decode_in_control is False


def test_steps_are_pipelined_on_cuda_only() -> None:
    assert ControlConfig.for_engine(EngineConfig(device="cuda")).pipeline is True
    assert ControlConfig.for_engine(EngineConfig(device="cpu")).pipeline is False
    assert ControlConfig.for_engine(EngineConfig(device="cuda"), pipeline=False).pipeline is False


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_cpu_model_loads_on_a_thread_that_is_gone_before_the_control_loop_starts(
        device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """So the control loop's thread is the only OpenMP pool left (engine._load_on_a_passing_thread)."""
    loaders: list[threading.Thread] = []

    def fake_start_executor(*args: object) -> object:
        loaders.append(threading.current_thread())
        raise RuntimeError("loaded")  # stop before the Controller: what matters is where this ran

    monkeypatch.setattr(engine_module, "start_executor", fake_start_executor)
    with pytest.raises(RuntimeError, match="loaded"):  # a failed load reaches the caller
        engine_module._start_control(Path("."), None, EngineConfig(device=device), progress=False)  # type: ignore[arg-type]
    [loader] = loaders
    if device == "cpu":
        assert loader is not threading.current_thread() and not loader.is_alive()
    else:
        assert loader is threading.current_thread()


def test_an_emulated_device_replaces_the_model_and_pipelines_its_steps(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIE_EMULATED_DEVICE_MS (engine/executor/emulated.py): no model is loaded, steps take that long, pipelined
    as on a GPU even with --device cpu; a decode runs on it to its end."""
    from pie_server.engine.executor.emulated import EmulatedExecutor
    from pie_server.engine.model.loader import load_model_config

    monkeypatch.setattr(engine_module, "start_executor", None)  # never called
    monkeypatch.setenv("PIE_EMULATED_DEVICE_MS", "2")
    executor, control = engine_module._start_control(tiny_llama_dir, load_model_config(tiny_llama_dir),
                                                     EngineConfig(device="cpu", num_pages=64), progress=False)
    try:
        assert isinstance(executor, EmulatedExecutor) and executor.step_s == 0.002
        assert control.config.pipeline is True
        assert _decodes_to_its_length(control, "emulated", 5)
    finally:
        control.stop()


def test_the_environment_chooses_the_speculation_depth_and_the_executor_process(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIE_SPECULATION_DEPTH=2 and PIE_EXECUTOR_PROCESS=1 (A/B runs): decodes two steps ahead, on an executor in a
    worker process (here the emulated device's); anything else than their values is refused."""
    from pie_server.engine.executor.remote import RemoteExecutor
    from pie_server.engine.model.loader import load_model_config

    monkeypatch.setenv("PIE_EMULATED_DEVICE_MS", "1")
    for name, value in (("PIE_SPECULATION_DEPTH", "3"), ("PIE_EXECUTOR_PROCESS", "yes")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            engine_module._start_control(tiny_llama_dir, load_model_config(tiny_llama_dir),
                                         EngineConfig(device="cpu", num_pages=64), progress=False)
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIE_SPECULATION_DEPTH", "2")
    monkeypatch.setenv("PIE_EXECUTOR_PROCESS", "1")
    executor, control = engine_module._start_control(tiny_llama_dir, load_model_config(tiny_llama_dir),
                                                     EngineConfig(device="cpu", num_pages=64), progress=False)
    try:
        assert isinstance(executor, RemoteExecutor) and control.config.speculation_depth == 2
        assert _decodes_to_its_length(control, "remote", 6)
    finally:
        control.stop()
        executor.close()


def _decodes_to_its_length(control: object, instance: str, max_new_tokens: int) -> bool:
    """A three-token prompt decoded on control (a started Controller) until max_new_tokens."""
    from pie_server.engine.control.decoding import DecodeRequest
    from pie_server.engine.step import SamplingParams

    control.open_instance(instance)  # type: ignore[attr-defined]
    [page] = control.allocate_pages(instance, 1).result(timeout=10)  # type: ignore[attr-defined]
    stream = control.decode(instance, DecodeRequest(  # type: ignore[attr-defined]
        token_ids=[1, 2, 3], position=0, page_ids=[page], context_len=0, sampling=SamplingParams(),
        max_new_tokens=max_new_tokens))
    return stream.done.result(timeout=10) == "length" and len(stream.drain()) == max_new_tokens

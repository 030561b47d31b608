"""The engine's choices by device: where the host-side generate decodes (docs/decisions/decoding-in-control.md)
and whether steps are pipelined (docs/decisions/pipelined-steps.md)."""
from __future__ import annotations

import pytest

from pie_server.engine.config import EngineConfig
from pie_server.engine.control.config import ControlConfig
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

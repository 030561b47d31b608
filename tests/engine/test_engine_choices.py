"""engine.engine.with_decode_choice: where the host-side generate decodes (docs/decisions/decoding-in-control.md)."""
from __future__ import annotations

import pytest

from pie_server.engine.config import EngineConfig
from pie_server.engine.engine import with_decode_choice
from pie_server.engine.runtime.config import RuntimeConfig


def test_by_device_unless_the_runtime_config_or_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIE_DECODE_IN_CONTROL", raising=False)
    assert with_decode_choice(RuntimeConfig(), EngineConfig(device="cpu")).decode_in_control is True
    assert with_decode_choice(RuntimeConfig(), EngineConfig(device="cuda")).decode_in_control is False
    assert with_decode_choice(RuntimeConfig(decode_in_control=True), EngineConfig(device="cuda")).decode_in_control
    monkeypatch.setenv("PIE_DECODE_IN_CONTROL", "1")
    assert with_decode_choice(RuntimeConfig(decode_in_control=False), EngineConfig(device="cuda")).decode_in_control
    monkeypatch.setenv("PIE_DECODE_IN_CONTROL", "0")
    assert with_decode_choice(RuntimeConfig(), EngineConfig(device="cpu")).decode_in_control is False

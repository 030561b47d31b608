"""kernels.launch: where programmatic dependent launch is used (its effect is measured on the GPU:
PIE_TRITON_PDL=0 python -m bench.gpu_decode)."""
from __future__ import annotations

import pytest
import torch

from pie_server.kernels import launch


def test_no_pdl_off_cuda_or_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not launch.uses_pdl(torch.device("cpu"))
    monkeypatch.setattr(launch, "_major", lambda device: 9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch.uses_pdl(torch.device("cuda"))


def test_pdl_from_hopper_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PIE_TRITON_PDL", raising=False)
    monkeypatch.setattr(launch, "_major", lambda device: 9)
    assert launch.uses_pdl(torch.device("cuda"))
    monkeypatch.setenv("PIE_TRITON_PDL", "0")
    assert not launch.uses_pdl(torch.device("cuda"))
    monkeypatch.delenv("PIE_TRITON_PDL")
    monkeypatch.setattr(launch, "_major", lambda device: 8)  # Ampere: no griddepcontrol
    assert not launch.uses_pdl(torch.device("cuda"))

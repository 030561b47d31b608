"""Host-to-device copies of step inputs that never make the host wait for the GPU.

A non_blocking copy from pageable host memory may synchronise with the stream (the driver stages it through
pinned memory), and a blocking one always does: either stalls the host until the GPU has finished the
previous step, which undoes the overlap of pipelined steps (engine/executor/pending.py). So step inputs go
through page-locked memory; PyTorch's caching host allocator keeps each buffer alive until its copy has run.
"""
from __future__ import annotations

import numpy as np
import torch


def pinned(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host tensor of `array` (page-locked when `device` is CUDA) for APIs that copy it themselves."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` on `device`, copied asynchronously on the current stream (CUDA) or shared (CPU)."""
    return pinned(array, device).to(device, non_blocking=True)

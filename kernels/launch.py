"""How the Triton kernels launch: under the CPU interpreter (tests), and with programmatic dependent launch
(PDL) for the kernels of the decode step.

On Hopper and later a kernel launched with PDL may start while the previous kernel in the stream drains: its
programs may do work that does not depend on that kernel (the split-KV attention reads its page table), then
wait for it (gdc_wait: every earlier kernel has finished and its writes are visible), and each kernel lets
the next one launch once its main loop is done (gdc_launch_dependents). In a CUDA graph this hides most of
the launch gap between the ~160 kernels of a batch-1 decode step (H100, Llama-3.1-8B: 5.26 -> 5.10 ms of
GPU per step, bench/results/gpu_decode_pdl_ab.json). Invariant of every kernel launched so: before gdc_wait
it reads only memory that no kernel of the step writes, and writes nothing. PIE_TRITON_PDL=0 in the
environment turns it off (for A/B measurements).
"""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, set before the kernels are defined): the kernels
    then take CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def uses_pdl(device: torch.device) -> bool:
    """True on CUDA devices of compute capability 9.0 or later (not under Triton's CPU interpreter)."""
    if device.type != "cuda" or interpreting():
        return False
    return os.environ.get("PIE_TRITON_PDL", "1") != "0" and _major(device) >= 9


@functools.lru_cache(maxsize=16)
def _major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]

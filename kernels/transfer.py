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


_ALIGN = 64  # bytes; every staged array starts on this boundary (torch views need their element alignment)
_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool,
                 np.dtype(np.float32): torch.float32}


class PinnedStaging:
    """Page-locked host memory that one owner (an attention backend, a graph runner) reuses step after step for
    its host-to-device copies, instead of a pin_memory() per array (an allocation from PyTorch's caching host
    allocator each time).

    stage() packs the arrays of one step into the next of `num_slots` buffers. Invariant: a buffer is rewritten
    only after every copy enqueued from its last use has run: the next stage() records an event on the current
    stream (after those copies, as every copy goes to that stream), and stage() waits for that event before it
    writes the buffer again. With pipelined steps (at most two in flight) the wait is normally over already.
    On the CPU nothing is copied asynchronously, so stage() returns the arrays as tensors (no buffer)."""

    def __init__(self, device: torch.device, num_slots: int = 3, slot_bytes: int = 4096) -> None:
        if num_slots < 2 or slot_bytes < _ALIGN:
            raise ValueError(f"PinnedStaging needs >= 2 slots of >= {_ALIGN} bytes")
        self.device = device
        self._buffers = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True)
                         for _ in range(num_slots)] if device.type == "cuda" else []
        self._events: list[torch.cuda.Event | None] = [None] * num_slots
        self._current: int | None = None  # the slot of the last stage()

    def stage(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """One flat host tensor per array (same dtype; int32, int64, bool or float32), valid until the
        num_slots-th next stage(); enqueue their copies on the current stream before that."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a).reshape(-1)) for a in arrays]
        slot = self._advance()
        offsets, end = [], 0
        for array in arrays:
            offsets.append(end)
            end += -(-array.nbytes // _ALIGN) * _ALIGN
        if end > self._buffers[slot].numel():  # the old buffer stays pinned until its recorded copies have run
            self._buffers[slot] = torch.empty(2 * end, dtype=torch.uint8, pin_memory=True)
        buffer = self._buffers[slot]
        host = buffer.numpy()
        staged = []
        for array, offset in zip(arrays, offsets):
            dtype = np.dtype(array.dtype)
            host[offset:offset + array.nbytes].view(dtype)[:] = array.reshape(-1)
            staged.append(buffer[offset:offset + array.nbytes].view(_TORCH_DTYPES[dtype]))
        return staged

    def _advance(self) -> int:
        """Closes the current slot's use (event after its copies) and opens the next, once its copies ran."""
        num_slots = len(self._buffers)
        if self._current is not None:
            event = self._events[self._current] or torch.cuda.Event()
            event.record()
            self._events[self._current] = event
        slot = 0 if self._current is None else (self._current + 1) % num_slots
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        self._current = slot
        return slot

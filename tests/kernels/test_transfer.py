"""kernels/transfer.py: the arrays arrive unchanged (pinning applies to CUDA only, as does the staging ring)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pie_server.kernels.transfer import PinnedStaging, pinned, to_device


def test_to_device_keeps_values_and_dtype() -> None:
    array = np.array([3, -1, 7], dtype=np.int64)
    tensor = to_device(array, torch.device("cpu"))
    assert tensor.dtype == torch.int64 and tensor.tolist() == [3, -1, 7]


def test_pinned_accepts_non_contiguous_arrays() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]
    tensor = pinned(array, torch.device("cpu"))
    assert tensor.shape == (3, 2) and tensor.tolist() == array.tolist() and not tensor.is_pinned()


@pytest.mark.gpu
def test_cuda_copies_go_through_pinned_memory() -> None:
    array = np.arange(1000, dtype=np.int64)
    assert pinned(array, torch.device("cuda")).is_pinned()
    tensor = to_device(array, torch.device("cuda"))
    assert tensor.is_cuda and torch.equal(tensor.cpu(), torch.from_numpy(array))


def test_staging_on_cpu_returns_each_array_flat_with_its_dtype() -> None:
    staging = PinnedStaging(torch.device("cpu"))
    arrays = [np.arange(6, dtype=np.int32).reshape(2, 3), np.array([True, False]), np.array([5], dtype=np.int64)]
    staged = staging.stage(*arrays)
    assert [t.dtype for t in staged] == [torch.int32, torch.bool, torch.int64]
    assert [t.tolist() for t in staged] == [list(range(6)), [True, False], [5]]


def test_staging_needs_two_slots() -> None:
    with pytest.raises(ValueError):
        PinnedStaging(torch.device("cpu"), num_slots=1)


@pytest.mark.gpu
def test_staging_reuses_pinned_slots_and_grows_them() -> None:
    staging = PinnedStaging(torch.device("cuda"), num_slots=2, slot_bytes=64)
    first, = staging.stage(np.arange(3, dtype=np.int64))
    big, small = staging.stage(np.arange(100, dtype=np.int64), np.array([1.5], dtype=np.float32))  # grows slot 1
    again, = staging.stage(np.array([9, 8], dtype=np.int64))  # slot 0 again
    assert first.is_pinned() and big.is_pinned()
    assert again.data_ptr() == first.data_ptr() and again.tolist() == [9, 8]
    assert big.tolist() == list(range(100)) and small.tolist() == [1.5]


@pytest.mark.gpu
def test_a_slot_is_not_rewritten_before_its_copy_has_run() -> None:
    """The copy from the first slot waits behind a long kernel; staging new values into that slot must wait
    for the copy, so the destination still gets the first values."""
    staging = PinnedStaging(torch.device("cuda"), num_slots=2)
    destination = torch.zeros(1000, dtype=torch.int64, device="cuda")
    first, = staging.stage(np.arange(1000, dtype=np.int64))
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time before the copy runs
    destination.copy_(first, non_blocking=True)
    staging.stage(np.zeros(1, dtype=np.int64))
    staging.stage(np.full(1000, -1, dtype=np.int64))  # the first slot again
    assert destination.tolist() == list(range(1000))

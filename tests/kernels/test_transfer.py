"""kernels/transfer.py on CPU: the arrays arrive unchanged (pinning applies to CUDA only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pie_server.kernels.transfer import pinned, to_device


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

"""kernels/ops.py: the CPU matmul (weight @ x.T at a few rows, oneDNN beyond) is F.linear, whatever the layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pie_server.kernels import ops


@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 9, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear(num_rows: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(num_rows, 64, generator=gen)
    transposed_x = x.t().contiguous().t()  # the same values, column-major (as a transposed matmul output is)
    for rows in (x, transposed_x):
        out = ops.linear(rows, weight, bias)
        assert out.shape == (num_rows, 96) and out.is_contiguous()  # all-reduce needs contiguous outputs
        torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.single_row_linear(x[:1], weight, bias), F.linear(x[:1], weight, bias))


def test_linear_leaves_its_inputs_alone() -> None:
    x, weight, bias = torch.randn(1, 8), torch.randn(4, 8), torch.randn(4)
    copies = [t.clone() for t in (x, weight, bias)]
    ops.linear(x, weight, bias).add_(1.0)  # the caller may write into the result
    assert all(torch.equal(a, b) for a, b in zip((x, weight, bias), copies))


def test_other_dtypes_and_shapes_take_f_linear() -> None:
    x, weight = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight))
    batched = torch.randn(3, 2, 8)
    torch.testing.assert_close(ops.linear(batched, weight.float()), F.linear(batched, weight.float()))

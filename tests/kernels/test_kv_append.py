"""kernels/kv_append.py: the Triton K/V append under Triton's CPU interpreter (where Triton is installed) against
the indexed assignment it replaces, and the fallback everywhere else. Copies only: results must be bit-equal."""
from __future__ import annotations

import pytest
import torch

import pie_server.kernels.kv_append as kv_append_module
from pie_server.kernels.kv_append import append_kv, append_kv_indexed
from tests.kernels.triton_interpreter import run_interpreted

# (dtype, Hkv, D, page_size, num_pages, slots, source_rows)
CASES = [
    ("bfloat16", 2, 64, 16, 8, [5, 17, 90, 40, 41], None),
    ("float32", 1, 24, 4, 6, [3, 9, 10, 22], [0, 1, 2, 1]),  # a row of 24 (not a power of two); a source row
    ("float16", 8, 128, 16, 4, list(range(16, 48)), None),  # two full pages
]

SCRIPT = r"""
import json, sys
import torch
from tests.kernels.test_kv_append import CASES, compare
print(json.dumps([compare(*case) for case in CASES]))
"""


def compare(dtype_name: str, num_kv_heads: int, head_dim: int, page_size: int, num_pages: int, slots: list[int],
            source_rows: list[int] | None) -> dict:
    """append_kv against append_kv_indexed on k and v taken as views of one qkv tensor (the decoder's layout),
    into caches of random contents."""
    gen = torch.Generator().manual_seed(3)
    dtype = getattr(torch, dtype_name)
    num_tokens, num_q = len(slots), 2 * num_kv_heads
    qkv = torch.randn(num_tokens, (num_q + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    k = qkv[:, num_q * head_dim:(num_q + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_q + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    cache = torch.randn(num_pages, 2, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slot_ids = torch.tensor(slots, dtype=torch.long)
    write_index = torch.cat([slot_ids // page_size, slot_ids % page_size])
    rows = None if source_rows is None else torch.tensor(source_rows, dtype=torch.long)
    got = append_kv(cache.clone(), k, v, write_index, rows)
    want = append_kv_indexed(cache.clone(), k, v, write_index, rows)
    return {"equal": bool(torch.equal(got, want)), "changed": bool(not torch.equal(got, cache))}


def test_the_triton_append_equals_the_indexed_assignment_under_the_interpreter() -> None:
    if kv_append_module.triton is None:
        pytest.skip("Triton is not installed (`make test` installs it; `pip install -e .[dev]` does not)")
    results = run_interpreted(SCRIPT, None)
    assert results == [{"equal": True, "changed": True}] * len(CASES)


def test_cpu_tensors_outside_the_interpreter_take_the_indexed_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the kernel never launches; the fallback's result is the reference's."""
    monkeypatch.setattr(kv_append_module, "_append_kernel", None, raising=False)  # a launch would fail
    assert compare(*CASES[1]) == {"equal": True, "changed": True}

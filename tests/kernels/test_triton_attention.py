"""kernels.triton_attention.TritonDecodeAttention: planning (CPU) and the backend end to end against the torch
reference backend under Triton's CPU interpreter (the kernels themselves: tests/kernels/test_decode_triton.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pie_server.engine.executor.cuda_graphs import CudaGraphDecoder

from pie_server.kernels import decode_triton, triton_attention
from pie_server.kernels.attention import AttentionStep
from pie_server.kernels.flashinfer_attention import AttentionShape
from pie_server.kernels.triton_attention import TritonDecodeAttention
from tests.kernels.triton_interpreter import run_interpreted

SHAPE = AttentionShape(num_qo_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)


def _decode_step(kv_lens: list[int], page_size: int = 4) -> AttentionStep:
    """Sequence b owns pages 2b+1, 2b+3, ... (interleaved, not contiguous); its new token is the last slot."""
    page_ids, indptr, last_lens, slots = [], [0], [], []
    for b, kv_len in enumerate(kv_lens):
        pages = [2 * b + 1 + 2 * len(kv_lens) * i for i in range(-(-kv_len // page_size))]
        page_ids += pages
        indptr.append(len(page_ids))
        last_lens.append((kv_len - 1) % page_size + 1)
        slots.append(pages[-1] * page_size + last_lens[-1] - 1)
    return AttentionStep(page_size=page_size, qo_indptr=list(range(len(kv_lens) + 1)), kv_page_indptr=indptr,
                         kv_page_ids=page_ids, kv_last_page_lens=last_lens, slot_ids=slots)


def test_plan_takes_only_decode_steps_of_its_batch_size_within_its_pages() -> None:
    backend = TritonDecodeAttention("cpu", SHAPE, batch_size=2, max_pages=6, num_sms=8)
    assert backend.num_splits == decode_triton.choose_num_splits(2, SHAPE.num_kv_heads, num_sms=8)
    with pytest.raises(ValueError, match="exactly 2"):
        backend.plan(_decode_step([5]))
    with pytest.raises(ValueError, match="more than"):
        backend.plan(_decode_step([13, 13]))  # 8 pages
    prefill = AttentionStep(page_size=4, qo_indptr=[0, 2, 3], kv_page_indptr=[0, 1, 2], kv_page_ids=[1, 2],
                            kv_last_page_lens=[2, 1], slot_ids=[4, 5, 8])
    with pytest.raises(ValueError, match="decode"):
        backend.plan(prefill)
    with pytest.raises(RuntimeError, match="plan"):
        backend.forward(torch.zeros(2, 4, 16), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), torch.zeros(1))
    backend.plan(_decode_step([5, 9]))
    assert backend._indptr.tolist() == [0, 2, 5] and backend._last_lens.tolist() == [1, 1]
    assert backend._page_ids[:5].tolist() == [1, 5, 3, 7, 11]
    with pytest.raises(ValueError, match="rows"):
        backend.forward(torch.zeros(3, 4, 16), torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), torch.zeros(1))


def _validated(step: AttentionStep) -> AttentionStep:
    """The step as the executor's step inputs hand it on: int64 arrays, source rows given, validated."""
    arrays = {name: np.asarray(getattr(step, name), np.int64) for name in
              ("qo_indptr", "kv_page_indptr", "kv_page_ids", "kv_last_page_lens", "slot_ids")}
    return dataclasses.replace(step, **arrays, source_rows=np.arange(step.num_seqs), validated=True)


@pytest.mark.parametrize("kv_lens", [[5], [5, 9, 1], [13, 4, 4, 8, 1], [3, 7, 2, 16, 5, 1, 9, 4]])
def test_a_validated_decode_step_is_padded_into_the_buffers_of_the_padded_step(kv_lens: list[int]) -> None:
    """plan() of a validated step of B <= 8 sequences (no copies, no checks) fills the device buffers exactly as
    plan() of the step that cuda_graphs pads to the bucket, on two backends whose buffers start differently."""
    step = _validated(_decode_step(kv_lens))
    padded = CudaGraphDecoder._padded(dataclasses.replace(step, validated=False), 8)
    fast, reference = (TritonDecodeAttention("cpu", SHAPE, batch_size=8, max_pages=40, num_sms=8) for _ in range(2))
    fast._int32.fill_(-7)
    fast.plan(step)
    reference.plan(padded)
    used = 2 * 8 + 1 + len(padded.kv_page_ids)
    assert torch.equal(fast._int32[:used], reference._int32[:used])
    assert torch.equal(fast._int64, reference._int64)
    assert fast.kv_write_index() is None and fast._planned


def test_a_validated_step_over_the_pages_is_refused() -> None:
    backend = TritonDecodeAttention("cpu", SHAPE, batch_size=4, max_pages=6, num_sms=8)
    with pytest.raises(ValueError, match="more than"):  # 4 + 2 pages, and 2 padding rows take one page each
        backend.plan(_validated(_decode_step([13, 5])))


_SCRIPT = r"""
import json, sys
import torch
import pie_server.kernels.ops as ops
from pie_server.kernels.attention import TorchAttention
from pie_server.kernels.triton_attention import TritonDecodeAttention
from tests.kernels.test_triton_attention import SHAPE, _decode_step
torch.manual_seed(0)
results = []
for kv_lens in json.loads(sys.argv[1]):
    step = _decode_step(kv_lens)
    num_seqs, hq, hkv, d = len(kv_lens), SHAPE.num_qo_heads, SHAPE.num_kv_heads, SHAPE.head_dim
    cache = torch.randn(4 * num_seqs * 8, 2, 4, hkv, d).to(torch.bfloat16)
    qkv = torch.randn(num_seqs, (hq + 2 * hkv) * d).to(torch.bfloat16)
    positions = torch.tensor([n - 1 for n in kv_lens])
    cos_sin = ops.rope_cos_sin_cache(__import__("pie_server.engine.config", fromlist=["RopeConfig"]).RopeConfig(), d, 64)
    def split(t):
        q, k, v = t.split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(num_seqs, hq, d), k.view(num_seqs, hkv, d), v.view(num_seqs, hkv, d)
    ref_cache, ref_qkv = cache.float(), qkv.float()
    reference = TorchAttention()
    reference.plan(step)
    want = reference.rope_and_forward(*split(ref_qkv), positions, cos_sin, ref_cache, ops.apply_rope)
    backend = TritonDecodeAttention("cpu", SHAPE, batch_size=num_seqs, max_pages=64, num_sms=4)
    backend.plan(step)
    got = backend.rope_and_forward(*split(qkv), positions, cos_sin, cache, ops.apply_rope)
    results.append(dict(out_err=float((got.float() - want).abs().max()),
                        cache_err=float((cache.float() - ref_cache).abs().max())))
print(json.dumps(results))
"""


@pytest.mark.skipif(decode_triton.triton is None,
                    reason="Triton is not installed (`make test` installs it; `pip install -e .[dev]` does not)")
def test_backend_matches_the_torch_reference_under_the_interpreter() -> None:
    results = run_interpreted(_SCRIPT, [[1], [5, 16, 9]])
    for r in results:  # bf16 inputs; the reference computes in fp32 from the same bf16 values
        assert r["out_err"] < 3e-2 and r["cache_err"] < 3e-2, r


def test_graph_buckets_up_to_64_use_these_kernels_unless_the_environment_says_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIE_TRITON_DECODE_MAX_BATCH", raising=False)
    assert triton_attention.max_batch_size() == triton_attention.MAX_BATCH_SIZE == 64
    monkeypatch.setenv("PIE_TRITON_DECODE_MAX_BATCH", "0")
    assert triton_attention.max_batch_size() == 0

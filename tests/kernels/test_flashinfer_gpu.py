"""FlashInfer attention and elementwise kernels against the torch references.

The host-side metadata tests run everywhere; the `gpu` tests need CUDA and FlashInfer (run by hand on the
GPU machine: `python -m pytest -m gpu tests/kernels/test_flashinfer_gpu.py`).
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

import pie_server.kernels.ops as torch_ops
from pie_server.engine.config import RopeConfig
from pie_server.kernels.attention import AttentionStep, TorchAttention
from pie_server.kernels.flashinfer_attention import AttentionShape, FlashInferAttention, build_host_metadata
from pie_server.kernels.kv_append import append_kv

PAGE_SIZE = 16


def _step(new_lens: list[int], context_lens: list[int], num_pages: int, rng: random.Random,
          masks: dict[int, np.ndarray] | None = None, page_size: int = PAGE_SIZE) -> AttentionStep:
    """Sequences with scattered, unordered pages; sequence b appends new_lens[b] tokens ending its context."""
    free = list(range(num_pages))
    rng.shuffle(free)
    qo, kv_indptr, page_ids, last_lens, slots, custom = [0], [0], [], [], [], []
    for b, (q_len, kv_len) in enumerate(zip(new_lens, context_lens)):
        pages = [free.pop() for _ in range(-(-kv_len // page_size))]
        page_ids.extend(pages)
        kv_indptr.append(len(page_ids))
        qo.append(qo[-1] + q_len)
        last_lens.append(kv_len - (len(pages) - 1) * page_size)
        slots.extend(pages[s // page_size] * page_size + s % page_size for s in range(kv_len - q_len, kv_len))
        mask = (masks or {}).get(b)
        custom.append(None if mask is None else mask.tolist())
    return AttentionStep(page_size=page_size, qo_indptr=qo, kv_page_indptr=kv_indptr, kv_page_ids=page_ids,
                         kv_last_page_lens=last_lens, slot_ids=slots,
                         custom_masks=custom if masks else None)


# -- host metadata (CPU) --------------------------------------------------------------------------------


def test_write_index_holds_pages_then_offsets() -> None:
    step = _step([2, 1], [18, 5], num_pages=8, rng=random.Random(0))
    meta = build_host_metadata(step)
    pages, offsets = meta.write_index.reshape(2, -1)
    assert [p * PAGE_SIZE + o for p, o in zip(pages, offsets)] == list(step.slot_ids)
    assert meta.source_rows.tolist() == [0, 1, 2]


@pytest.mark.parametrize("layout", ["qkv_views", "separate"])
def test_append_kv_matches_reference_scatter(layout: str) -> None:
    step = _step([3, 1, 4], [3, 20, 40], num_pages=12, rng=random.Random(1))
    if layout == "qkv_views":  # k and v as the decoder makes them: adjacent column blocks of one qkv tensor
        _, k, v = torch.randn(8, 8, 4).split([4, 2, 2], dim=1)
    else:
        k, v = torch.randn(8, 2, 4), torch.randn(8, 2, 4)
    cache = append_kv(torch.zeros(12, 2, PAGE_SIZE, 2, 4), k, v,
                      torch.from_numpy(build_host_metadata(step).write_index))
    slots = torch.tensor(step.slot_ids)
    torch.testing.assert_close(cache[slots // PAGE_SIZE, 0, slots % PAGE_SIZE], k, rtol=0, atol=0)
    torch.testing.assert_close(cache[slots // PAGE_SIZE, 1, slots % PAGE_SIZE], v, rtol=0, atol=0)
    assert int((cache != 0).any(-1).any(-1).sum()) == 2 * len(step.slot_ids), "nothing else is written"


def test_append_kv_with_source_rows_writes_the_sources_kv() -> None:
    write_index = torch.tensor([3, 5, 3, 3, 7, 2, 7, 7])  # rows 2, 3 repeat row 0's slot (page 3, offset 7)
    k, v = torch.randn(4, 1, 2), torch.randn(4, 1, 2)
    cache = append_kv(torch.zeros(6, 2, PAGE_SIZE, 1, 2), k, v, write_index, torch.tensor([0, 1, 0, 0]))
    assert torch.equal(cache[3, 0, 7], k[0]) and torch.equal(cache[3, 1, 7], v[0])
    assert torch.equal(cache[5, 0, 2], k[1]) and torch.equal(cache[5, 1, 2], v[1])


def test_mask_is_causal_bottom_right_except_where_given() -> None:
    custom = np.zeros((2, 5), dtype=bool)
    custom[:, 0] = True
    step = _step([3, 2], [4, 5], num_pages=4, rng=random.Random(2), masks={1: custom})
    mask = build_host_metadata(step).mask
    assert mask is not None and mask.shape == (3 * 4 + 2 * 5,)
    causal = mask[:12].reshape(3, 4)
    assert causal.tolist() == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]
    assert (mask[12:].reshape(2, 5) == custom).all()


def test_bad_steps_are_rejected() -> None:
    good = _step([1], [3], num_pages=2, rng=random.Random(3))
    with pytest.raises(ValueError, match="kv_last_page_lens"):
        build_host_metadata(AttentionStep(PAGE_SIZE, [0, 1], [0, 1], [0], [0], [0]))
    with pytest.raises(ValueError, match="more new tokens"):
        build_host_metadata(AttentionStep(PAGE_SIZE, [0, 4], [0, 1], [0], [3], [0, 1, 2, 3]))
    with pytest.raises(ValueError, match="one slot per new token"):
        build_host_metadata(AttentionStep(PAGE_SIZE, good.qo_indptr, good.kv_page_indptr, good.kv_page_ids,
                                          good.kv_last_page_lens, [0, 1]))
    with pytest.raises(ValueError, match="mask of sequence 0"):
        _ = build_host_metadata(_step([2], [3], 2, random.Random(4), masks={0: np.ones((3, 3), dtype=bool)}))


def test_shape_is_validated() -> None:
    with pytest.raises(ValueError, match="multiple"):
        AttentionShape(6, 4, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        AttentionShape(8, 2, 64, torch.float32)


# -- FlashInfer on the GPU ------------------------------------------------------------------------------

gpu = pytest.mark.gpu
HEADS = [(32, 8, 128), (9, 3, 64), (8, 8, 128)]  # Llama-3.1-8B, SmolLM2-135M, MHA
# bf16 for every shape; fp16 for head_dim 128 only (each dtype x head_dim is one more compiled module).
SHAPES = [(h, torch.bfloat16) for h in HEADS] + [(h, torch.float16) for h in HEADS if h[2] == 128]
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _qkv(num_tokens: int, heads: tuple[int, int, int], dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_qo, num_kv, dim = heads
    qkv = torch.randn(num_tokens, num_qo + 2 * num_kv, dim, device="cuda", generator=gen).to(dtype)
    return qkv.split([num_qo, num_kv, num_kv], dim=1)  # strided views, like the decoder's


def _both(step: AttentionStep, heads: tuple[int, int, int], dtype: torch.dtype, seed: int = 0,
          num_pages: int = 64, shape_known: bool = True):
    """Runs FlashInfer and the torch reference on one random cache; returns outputs and caches."""
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    cache = torch.randn(num_pages, 2, PAGE_SIZE, heads[1], heads[2], device="cuda", generator=gen).to(dtype)
    q, k, v = _qkv(step.num_tokens, heads, dtype, seed)
    shape = AttentionShape(*heads, dtype) if shape_known else None
    fi, ref = FlashInferAttention("cuda", shape), TorchAttention("cuda")
    fi_cache, ref_cache = cache.clone(), cache.clone()
    fi.plan(step)
    ref.plan(step)
    fi_out = fi.forward(q, k, v, fi_cache)
    ref_out = ref.forward(q.float(), k.float(), v.float(), ref_cache)
    return fi_out, ref_out, fi_cache, ref_cache


@gpu
@pytest.mark.parametrize("heads,dtype", SHAPES)
@pytest.mark.parametrize("case", ["decode", "prefill", "mixed", "custom_mask"])
def test_flashinfer_matches_torch_reference(case: str, heads: tuple[int, int, int], dtype: torch.dtype) -> None:
    rng = random.Random(zlib.crc32(f"{case}{heads}".encode()))
    masks = None
    if case == "decode":
        new, ctx = [1] * 6, [1, 15, 16, 17, 100, 333]
    elif case == "prefill":
        new = ctx = [1, 7, 16, 33, 200]
    elif case == "mixed":  # chunked prefill continuing a context, fresh prompts and decodes in one step
        new, ctx = [40, 1, 17, 1, 64], [90, 51, 17, 300, 64]
    else:
        new, ctx = [5, 1, 8, 3], [9, 30, 8, 40]
        tree = np.tri(5, 9, 4, dtype=bool)
        tree[3, 6:8] = False  # token 3 branches off token 0's path: sees neither token 1 nor 2
        masks = {0: tree, 3: np.random.default_rng(0).random((3, 40)) < 0.5}
        masks[3][:, 0] = True
    step = _step(new, ctx, num_pages=64, rng=rng, masks=masks)
    assert step.is_decode == (case == "decode")
    fi_out, ref_out, fi_cache, ref_cache = _both(step, heads, dtype, shape_known=case != "mixed")
    assert fi_out.shape == (step.num_tokens, heads[0], heads[2]) and fi_out.dtype == dtype
    torch.testing.assert_close(fi_out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(fi_cache, ref_cache), "KV append must write the same slots with the same values"


@gpu
def test_graph_mode_replay_equals_the_same_backend_run_eagerly() -> None:
    """Capture one decode attention call; replay it for a different step (new pages, lengths, KV writes)."""
    heads, dtype, size = (32, 8, 128), torch.bfloat16, 8
    shape = AttentionShape(*heads, dtype)
    page_ids = torch.zeros(256, dtype=torch.int32, device="cuda")
    graphed = FlashInferAttention("cuda", shape, graph_batch_size=size, page_id_buffer=page_ids)
    cache = torch.randn(128, 2, PAGE_SIZE, 8, 128, device="cuda").to(dtype)
    q_buf, k_buf, v_buf = (t.clone() for t in _qkv(size, heads, dtype, seed=0))
    graphed.plan(_step([1] * size, [3] * size, 128, random.Random(0)))
    graphed.forward(q_buf, k_buf, v_buf, cache.clone())  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    live = cache.clone()
    with torch.cuda.graph(graph):
        out = graphed.forward(q_buf, k_buf, v_buf, live)
    for seed, ctx in enumerate([[1, 2, 16, 17, 40, 99, 250, 500], [700, 1, 1, 3, 64, 65, 200, 31]]):
        step = _step([1] * size, ctx, 128, random.Random(seed + 10))
        for buf, new in zip((q_buf, k_buf, v_buf), _qkv(size, heads, dtype, seed + 20)):
            buf.copy_(new)
        before = live.clone()
        graphed.plan(step)
        graph.replay()
        eager_cache = before.clone()
        eager = FlashInferAttention("cuda", shape, graph_batch_size=size, page_id_buffer=page_ids.clone())
        eager.plan(step)
        expected = eager.forward(q_buf, k_buf, v_buf, eager_cache)
        assert torch.equal(out, expected) and torch.equal(live, eager_cache)
        reference = TorchAttention("cuda")
        reference.plan(step)
        want = reference.forward(q_buf.float(), k_buf.float(), v_buf.float(), before.clone())
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)])
def test_graph_mode_triton_rope_append_equals_rope_then_append(heads: tuple[int, int, int],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph-mode rope_and_forward rotates and appends with one Triton kernel (padding rows write their source
    row's K/V): the same cache and output as FlashInfer's rope then append_kv with the gather of source rows."""
    dtype, size = torch.bfloat16, 8
    shape = AttentionShape(*heads, dtype)
    cos_sin = torch_ops.rope_cos_sin_cache(RopeConfig(theta=500000.0), heads[2], 4096, "cuda")
    ctx = [17, 40, 3, 250]
    step = _step([1] * 4, ctx, 64, random.Random(3))
    padded = AttentionStep(page_size=PAGE_SIZE, qo_indptr=list(range(size + 1)),
                           kv_page_indptr=[*step.kv_page_indptr] + [step.kv_page_indptr[-1] + (i + 1) *
                                          (step.kv_page_indptr[1] - step.kv_page_indptr[0]) for i in range(4)],
                           kv_page_ids=[*step.kv_page_ids] + [*step.kv_page_ids[:step.kv_page_indptr[1]]] * 4,
                           kv_last_page_lens=[*step.kv_last_page_lens] + [step.kv_last_page_lens[0]] * 4,
                           slot_ids=[*step.slot_ids] + [step.slot_ids[0]] * 4)  # rows 4..7 copy row 0
    positions = torch.tensor([c - 1 for c in ctx] + [ctx[0] - 1] * 4, device="cuda")
    cache = torch.randn(64, 2, PAGE_SIZE, heads[1], heads[2], device="cuda").to(dtype)
    outputs, caches = [], []
    for triton_on in ("1", "0"):
        monkeypatch.setenv("PIE_FI_TRITON_ROPE_APPEND", triton_on)
        backend = FlashInferAttention("cuda", shape, graph_batch_size=size,
                                      page_id_buffer=torch.zeros(256, dtype=torch.int32, device="cuda"))
        q, k, v = (t.clone() for t in _qkv(size, heads, dtype, seed=5))
        k[4:] = torch.randn_like(k[4:])  # padding rows' own K/V differ: only row 0's may land in its slot
        backend.plan(padded)
        live = cache.clone()
        outputs.append(backend.rope_and_forward(q, k, v, positions, cos_sin, live, torch_ops.apply_rope))
        caches.append(live)
    torch.testing.assert_close(outputs[0][:4].float(), outputs[1][:4].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(caches[0].float(), caches[1].float(), atol=2e-2, rtol=2e-2)
    assert not torch.equal(caches[0], cache)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ops_match_torch_ops(dtype: torch.dtype) -> None:
    import pie_server.kernels.gpu_ops as gpu_ops
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 576, device="cuda", generator=gen).to(dtype)
    residual = torch.randn(37, 576, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(576, device="cuda", generator=gen)).to(dtype)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(gpu_ops.rms_norm(x, weight, 1e-5), torch_ops.rms_norm(x, weight, 1e-5), **tol)
    want_normed, want_sum = torch_ops.add_rms_norm(x, residual, weight, 1e-5)
    normed, summed = gpu_ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    torch.testing.assert_close(summed, want_sum, **tol)
    torch.testing.assert_close(normed, want_normed, **tol)
    gate_up = torch.randn(37, 2 * 1536, device="cuda", generator=gen).to(dtype)
    torch.testing.assert_close(gpu_ops.silu_and_mul(gate_up), torch_ops.silu_and_mul(gate_up), **tol)
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)
    cache = torch_ops.rope_cos_sin_cache(rope, 128, 4096, "cuda")
    positions = torch.randint(0, 4096, (37,), device="cuda", generator=gen)
    qkv = torch.randn(37, 48, 128, device="cuda", generator=gen).to(dtype)
    q, k, _ = qkv.split([32, 8, 8], dim=1)
    want_q, want_k = torch_ops.apply_rope(q, k, positions, cache)
    got_q, got_k = gpu_ops.apply_rope(q, k, positions, cache)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)

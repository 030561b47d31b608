"""kernels.decode_triton: validation and choose_num_splits everywhere; the kernels under Triton's CPU interpreter
where Triton is installed (the CUDA tests: tests/kernels/test_decode_triton_gpu.py).

Tolerances. decode_attention: q, K and V are exact in their dtype; the kernel's error against the float64
softmax is the rounding of the softmax weights to the cache dtype before P @ V (relative u each, so at most
u * sum_i p_i |v_i|) plus the output's rounding (u * |out| <= the same), plus fp32 noise: the bound is
2u * (P @ |V|) + 1e-4, with u = 2**-8 (bf16) / 2**-11 (fp16) on the GPU and 2**-7 for bf16 under the
interpreter, which casts fp32 to bf16 by truncation. rope_append: the same fp32 formula as ops.apply_rope,
so results differ by at most one ulp of the dtype (truncation, or an FMA on the GPU): 2 ulps are allowed.
"""
from __future__ import annotations

import math

import pytest
import torch

import pie_server.kernels.decode_triton as decode_module
import pie_server.kernels.ops as torch_ops
from pie_server.engine.config import RopeConfig
from pie_server.kernels.attention import AttentionStep, TorchAttention
from pie_server.kernels.decode_triton import choose_num_splits, decode_attention, rope_append
from pie_server.kernels.kv_append import append_kv_indexed as append_kv
from tests.kernels.triton_interpreter import run_interpreted

PAGE_SIZE = 16
H100_SMS = 132


def _has_triton() -> bool:
    return decode_module.triton is not None


def unit_roundoff(dtype: torch.dtype, device: str) -> float:
    if dtype == torch.float16:
        return 2.0 ** -11
    return 2.0 ** -8 if device == "cuda" else 2.0 ** -7


# -- cases and float64 references (also imported by the interpreter subprocess) ---------------------------


def make_paged_cache(kv_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                     gen: torch.Generator, page_size: int = PAGE_SIZE, spare_pages: int = 3
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache whose sequences own shuffled pages among spare ones; every slot no sequence owns holds NaN, so
    reading one shows in the output. Returns kv_cache, kv_page_indptr, kv_page_ids, kv_last_page_lens."""
    pages_per_seq = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    kv_cache = torch.randn(num_pages, 2, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_pages, generator=gen).tolist()
    indptr, page_ids, last_lens = [0], [], []
    for kv_len, count in zip(kv_lens, pages_per_seq):
        pages = [order.pop() for _ in range(count)]
        last_lens.append(kv_len - (count - 1) * page_size)
        kv_cache[pages[-1], :, last_lens[-1]:] = float("nan")
        page_ids += pages
        indptr.append(len(page_ids))
    kv_cache[order] = float("nan")  # the spare pages
    as_int32 = dict(dtype=torch.int32, device=device)
    return (kv_cache.to(device), torch.tensor(indptr, **as_int32), torch.tensor(page_ids, **as_int32),
            torch.tensor(last_lens, **as_int32))


def reference_decode(q: torch.Tensor, kv_cache: torch.Tensor, indptr: torch.Tensor, page_ids: torch.Tensor,
                     last_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 softmax over each sequence's gathered K/V: (out [B, Hq, D], P @ |V| [B, Hq, D])."""
    page_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    group = q.shape[1] // num_kv_heads
    outs, mags = [], []
    for b in range(q.shape[0]):
        pages = page_ids[int(indptr[b]):int(indptr[b + 1])].long()
        kv_len = (len(pages) - 1) * page_size + int(last_lens[b])
        kv = kv_cache[pages].double().transpose(0, 1).reshape(2, -1, num_kv_heads, head_dim)[:, :kv_len]
        k, v = (x.repeat_interleave(group, dim=1) for x in kv)  # [N, Hq, D]
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) / math.sqrt(head_dim), dim=-1)
        outs.append(torch.einsum("hn,nhd->hd", probs, v))
        mags.append(torch.einsum("hn,nhd->hd", probs, v.abs()))
    return torch.stack(outs), torch.stack(mags)


def _nan_out(batch: int, num_q_heads: int, head_dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A strided [B, Hq, D] view of NaN: every element must be written."""
    out = torch.full((batch, num_q_heads, 2 * head_dim), float("nan"), dtype=dtype, device=device)
    return out[..., :head_dim]


def run_decode_case(dtype_name: str, num_q_heads: int, num_kv_heads: int, head_dim: int, kv_lens: list[int],
                    splits: list[int], device: str = "cpu", seed: int = 0, page_size: int = PAGE_SIZE,
                    spike_last: bool = False) -> list[dict]:
    """decode_attention on a q view of a qkv tensor, once per split count (odd ones into a NaN-filled strided
    `out`): each result's worst excess over the tolerance (<= 0 passes), shape, dtype and finiteness.
    spike_last: each sequence's last key is twice its group's
    first query, so that token dominates."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    kv_cache, indptr, page_ids, last_lens = make_paged_cache(kv_lens, num_kv_heads, head_dim, dtype, device, gen,
                                                             page_size)
    batch, width = len(kv_lens), (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(batch, width, generator=gen) * 2).to(dtype).to(device)
    q = qkv[:, :num_q_heads * head_dim].view(batch, num_q_heads, head_dim)
    if spike_last:
        last_pages = page_ids[indptr[1:] - 1].long()
        for h in range(num_kv_heads):
            kv_cache[last_pages, 0, last_lens.long() - 1, h] = q[:, h * (num_q_heads // num_kv_heads)] * 2
    ref, mag = reference_decode(q, kv_cache, indptr, page_ids, last_lens)
    bound = 2 * unit_roundoff(dtype, device) * mag + 1e-4
    results = []
    for i, num_splits in enumerate(splits):
        out = _nan_out(batch, num_q_heads, head_dim, dtype, device) if i % 2 else None
        result = decode_attention(q, kv_cache, indptr, page_ids, last_lens, num_splits, out=out)
        results.append(dict(splits=num_splits, shape=list(result.shape), dtype=str(result.dtype),
                            into_out=out is None or result.data_ptr() == out.data_ptr(),
                            finite=bool(torch.isfinite(result).all()),
                            excess=float(((result.double() - ref).abs() - bound).max())))
    return results


def run_rope_case(dtype_name: str, num_q_heads: int, num_kv_heads: int, head_dim: int, slots: list[int],
                  source_rows: list[int] | None, device: str = "cpu", seed: int = 0, num_pages: int = 6,
                  positions_dtype: str = "int64") -> dict:
    """rope_append on views of one qkv tensor against ops.apply_rope + append_kv on copies: q's worst excess
    over 2 ulps, the cache's at the written slots, and whether everything else (the cache's other slots, the
    k/v columns of qkv) is bit-identical."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    num_tokens, q_width, kv_width = len(slots), num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width, generator=gen).to(dtype).to(device)
    views = (qkv[:, :q_width], qkv[:, q_width:q_width + kv_width], qkv[:, q_width + kv_width:])
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in views)
    positions = torch.randint(0, 4000, (num_tokens,), generator=gen).to(getattr(torch, positions_dtype)).to(device)
    cos_sin = torch_ops.rope_cos_sin_cache(RopeConfig(theta=500000.0), head_dim, 4096, device)
    kv_cache = torch.randn(num_pages, 2, PAGE_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    slot_ids = torch.tensor(slots, dtype=torch.int64)
    write_index = torch.cat([slot_ids // PAGE_SIZE, slot_ids % PAGE_SIZE]).to(device)
    src = None if source_rows is None else torch.tensor(source_rows, dtype=torch.int64, device=device)

    ref_q, ref_k = torch_ops.apply_rope(q.clone(), k.clone(), positions.long(), cos_sin)
    ref_cache = append_kv(kv_cache.clone(), ref_k, v.clone(), write_index, src)
    kv_before = qkv[:, q_width:].clone()
    rope_append(q, k, v, positions, cos_sin, kv_cache, write_index, src)

    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    written = torch.zeros(num_pages, PAGE_SIZE, dtype=torch.bool, device=device)
    written[write_index[:num_tokens], write_index[num_tokens:]] = True

    def excess(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((x.double() - ref.double()).abs() - 2 * ulp * ref.double().abs() - 1e-6).max())

    by_slot, ref_by_slot = kv_cache.transpose(1, 2), ref_cache.transpose(1, 2)  # [P, S, 2, Hkv, D]
    return dict(q_excess=excess(q, ref_q), cache_excess=excess(by_slot[written], ref_by_slot[written]),
                others_untouched=bool(torch.equal(by_slot[~written], ref_by_slot[~written])),
                kv_columns_untouched=bool(torch.equal(qkv[:, q_width:], kv_before)))


# -- choose_num_splits and validation (CPU, no Triton needed) ---------------------------------------------


def test_choose_num_splits_fills_the_gpu_at_small_batches() -> None:
    assert [choose_num_splits(b, 8, num_sms=H100_SMS) for b in (1, 2, 8, 33, 64)] == [33, 17, 5, 1, 1]
    assert [choose_num_splits(b, 3, num_sms=H100_SMS) for b in (1, 2, 64, 256)] == [64, 44, 2, 1]
    assert choose_num_splits(1, 8, max_splits=16) == 16
    for batch in range(1, 200):  # two programs per SM, and no split more than that needs
        splits = choose_num_splits(batch, 8)
        assert 1 <= splits <= 64 and batch * 8 * splits >= 2 * H100_SMS
        assert splits == 1 or batch * 8 * (splits - 1) < 2 * H100_SMS


@pytest.mark.parametrize("args", [(0, 8), (1, 0), (1, 8, 0), (1, 8, 64, 0)])
def test_choose_num_splits_rejects_non_positive_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        choose_num_splits(*args)


def _decode_inputs() -> dict:
    i32 = dict(dtype=torch.int32)
    return dict(q=torch.randn(2, 8, 64, dtype=torch.bfloat16), kv_page_indptr=torch.arange(3, **i32),
                kv_cache=torch.zeros(6, 2, PAGE_SIZE, 2, 64, dtype=torch.bfloat16),
                kv_page_ids=torch.arange(2, **i32), kv_last_page_lens=torch.ones(2, **i32), num_splits=2)


_BAD_DECODE = [  # (what, field replacements, message fragment)
    ("q not 3-D", dict(q=torch.randn(2, 512, dtype=torch.bfloat16)), "q must be"),
    ("float32 q", dict(q=torch.randn(2, 8, 64)), "q must be one of"),
    ("head_dim not a power of two", dict(q=torch.randn(2, 8, 48, dtype=torch.bfloat16)), "power of two"),
    ("Hq not a multiple of Hkv", dict(q=torch.randn(2, 9, 64, dtype=torch.bfloat16)), "multiple"),
    ("D mismatch", dict(kv_cache=torch.zeros(6, 2, PAGE_SIZE, 2, 128, dtype=torch.bfloat16)), "head_dim mismatch"),
    ("cache dtype", dict(kv_cache=torch.zeros(6, 2, PAGE_SIZE, 2, 64, dtype=torch.float16)), "kv_cache is"),
    ("cache not 5-D", dict(kv_cache=torch.zeros(6, 2, PAGE_SIZE, 128, dtype=torch.bfloat16)), "kv_cache must be"),
    ("cache without K/V axis", dict(kv_cache=torch.zeros(6, 3, PAGE_SIZE, 2, 64, dtype=torch.bfloat16)), "2, page"),
    ("page size 12", dict(kv_cache=torch.zeros(6, 2, 12, 2, 64, dtype=torch.bfloat16)), "page_size"),
    ("strided cache", dict(kv_cache=torch.zeros(6, 2, PAGE_SIZE, 2, 128, dtype=torch.bfloat16)[..., ::2]),
     "contiguous"),
    ("int64 indptr", dict(kv_page_indptr=torch.arange(3)), "kv_page_indptr must be torch.int32"),
    ("short indptr", dict(kv_page_indptr=torch.arange(2, dtype=torch.int32)), "kv_page_indptr must be a"),
    ("int64 page ids", dict(kv_page_ids=torch.arange(2)), "kv_page_ids must be torch.int32"),
    ("too few page ids", dict(kv_page_ids=torch.arange(1, dtype=torch.int32)), "length >= 2"),
    ("last lens length", dict(kv_last_page_lens=torch.ones(3, dtype=torch.int32)), "kv_last_page_lens must be a"),
    ("2-D last lens", dict(kv_last_page_lens=torch.ones(2, 1, dtype=torch.int32)), "kv_last_page_lens must be a"),
    ("zero splits", dict(num_splits=0), "num_splits"),
    ("q's last dim strided", dict(q=torch.randn(2, 8, 128, dtype=torch.bfloat16)[..., ::2]), "contiguous"),
]


@pytest.mark.parametrize("what,fields,message", _BAD_DECODE, ids=[c[0] for c in _BAD_DECODE])
def test_decode_attention_rejects_bad_inputs(what: str, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_attention(**{**_decode_inputs(), **fields})


@pytest.mark.parametrize("out,message", [(torch.empty(2, 8, 32, dtype=torch.bfloat16), "out must be"),
                                         (torch.empty(2, 8, 64, dtype=torch.float16), "out must be")])
def test_decode_attention_rejects_a_bad_out(out: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_attention(**_decode_inputs(), out=out)


def _rope_inputs(num_tokens: int = 3) -> dict:
    qkv = torch.randn(num_tokens, (8 + 2 * 2) * 64, dtype=torch.bfloat16)
    return dict(q=qkv[:, :512].view(num_tokens, 8, 64), k=qkv[:, 512:640].view(num_tokens, 2, 64),
                v=qkv[:, 640:].view(num_tokens, 2, 64), positions=torch.arange(num_tokens),
                cos_sin_cache=torch.zeros(32, 64), kv_cache=torch.zeros(4, 2, PAGE_SIZE, 2, 64, dtype=torch.bfloat16),
                write_index=torch.zeros(2 * num_tokens, dtype=torch.long))


_BAD_ROPE = [
    ("k heads differ from the cache", dict(k=torch.randn(3, 3, 64, dtype=torch.bfloat16)), "k must be"),
    ("v rows", dict(v=torch.randn(2, 2, 64, dtype=torch.bfloat16)), "v must be"),
    ("v dtype", dict(v=torch.randn(3, 2, 64, dtype=torch.float16)), "v is"),
    ("positions length", dict(positions=torch.arange(4)), "positions must be"),
    ("float positions", dict(positions=torch.zeros(3)), "positions must be torch.int32 or torch.int64"),
    ("write_index length", dict(write_index=torch.zeros(3, dtype=torch.long)), "write_index must be"),
    ("source_rows length", dict(source_rows=torch.zeros(2, dtype=torch.long)), "source_rows must be"),
    ("bf16 cos/sin cache", dict(cos_sin_cache=torch.zeros(32, 64, dtype=torch.bfloat16)), "cos_sin_cache"),
    ("cos/sin width", dict(cos_sin_cache=torch.zeros(32, 32)), "cos_sin_cache"),
    ("cache D", dict(kv_cache=torch.zeros(4, 2, PAGE_SIZE, 2, 32, dtype=torch.bfloat16)), "head_dim mismatch"),
    ("q dtype", dict(q=torch.randn(3, 8, 64, dtype=torch.float16)), "kv_cache is"),
]


@pytest.mark.parametrize("what,fields,message", _BAD_ROPE, ids=[c[0] for c in _BAD_ROPE])
def test_rope_append_rejects_bad_inputs(what: str, fields: dict, message: str) -> None:
    inputs = {**_rope_inputs(), **fields}
    before = inputs["kv_cache"].clone(), inputs["q"].clone()
    with pytest.raises(ValueError, match=message):
        rope_append(**inputs)
    assert torch.equal(inputs["kv_cache"], before[0]) and torch.equal(inputs["q"], before[1])


def test_cpu_tensors_are_rejected_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        decode_attention(**_decode_inputs())
    with pytest.raises(ValueError, match="CUDA"):
        rope_append(**_rope_inputs())


def test_entry_points_raise_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "triton", None)
    monkeypatch.setattr(decode_module, "_interpreting", lambda: True)  # let CPU tensors past the device check
    with pytest.raises(RuntimeError, match="Triton"):
        decode_attention(**_decode_inputs())
    with pytest.raises(RuntimeError, match="Triton"):
        rope_append(**_rope_inputs())


def test_reference_decode_matches_torch_attention() -> None:
    """The float64 reference used below agrees with kernels.attention's TorchAttention on a GQA decode step."""
    gen = torch.Generator().manual_seed(3)
    kv_cache, indptr, page_ids, last_lens = make_paged_cache([5, 16, 40], 2, 32, torch.float64, "cpu", gen)
    kv_cache = torch.nan_to_num(kv_cache)  # SDPA multiplies masked slots by 0, which NaN survives
    q = torch.randn(3, 6, 32, dtype=torch.float64, generator=gen)
    last_pages, last_slots = page_ids[indptr[1:] - 1].long(), last_lens.long() - 1  # the new tokens' slots
    backend = TorchAttention()
    backend.plan(AttentionStep(PAGE_SIZE, [0, 1, 2, 3], indptr.tolist(), page_ids.tolist(), last_lens.tolist(),
                               (last_pages * PAGE_SIZE + last_slots).tolist()))
    new_k, new_v = kv_cache[last_pages, 0, last_slots], kv_cache[last_pages, 1, last_slots]
    expected = backend.forward(q, new_k, new_v, kv_cache.clone())
    ref, mag = reference_decode(q, kv_cache, indptr, page_ids, last_lens)
    torch.testing.assert_close(ref, expected, rtol=1e-10, atol=1e-10)
    assert bool((mag >= ref.abs() - 1e-12).all())


# -- the kernels under Triton's CPU interpreter -----------------------------------------------------------

_INTERPRETER_SCRIPT = r"""
import json, sys
from tests.kernels.test_decode_triton import run_decode_case, run_rope_case
from tests.kernels.test_decode_triton_gpu import run_graph_step_case
cases = json.loads(sys.argv[1])
print(json.dumps(dict(decode=[run_decode_case(*c) for c in cases["decode"]],
                      rope=[run_rope_case(*c) for c in cases["rope"]], graph_step=run_graph_step_case())))
"""
_DECODE_CASES = [  # (dtype, Hq, Hkv, D, kv_lens, split counts[, device, seed, page_size])
    ("bfloat16", 2, 2, 64, [1], [1, 2]),  # one sequence of one token; split 1 empty
    ("float16", 4, 2, 64, [16, 37, 48], [1, 2, 5, 16]),  # full last pages; more splits than pages
    ("bfloat16", 8, 2, 128, [70, 5, 129], [2, 5]),  # Llama-3.1-8B's group of 4 and head_dim
    ("float16", 8, 2, 128, [33], [3]),
    ("bfloat16", 6, 2, 64, [33, 130], [3, 1]),  # SmolLM2's group of 3
    ("float16", 8, 1, 64, [20, 3], [1, 70]),  # group of 8; two merge chunks, the second empty
    ("bfloat16", 2, 1, 16, [1050], [70]),  # 66 pages over 70 splits: non-empty splits in the second chunk
    ("float16", 2, 1, 16, [1050], [70], "cpu", 2, 16, True),  # ... and the second chunk holds the maximum
    ("float16", 3, 3, 32, [9, 30], [1, 2], "cpu", 1, 4),  # 4-token pages: 16 pages per block
]
_ROPE_CASES = [  # (dtype, Hq, Hkv, D, slots, source_rows[, device, seed, num_pages, positions dtype])
    ("bfloat16", 4, 2, 64, [5, 17, 90, 40], None),
    ("float16", 6, 2, 128, [3, 60, 61, 3, 3], [0, 1, 2, 0, 0], "cpu", 1, 6, "int32"),  # graph padding
    ("bfloat16", 3, 1, 64, [7, 8, 8, 9], [0, 1, 1, 3]),  # a duplicate of a middle row
]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not _has_triton():
        pytest.skip("Triton is not installed (`make test` installs it; `pip install -e .[dev]` does not)")
    return run_interpreted(_INTERPRETER_SCRIPT, dict(decode=_DECODE_CASES, rope=_ROPE_CASES))


@pytest.mark.parametrize("case", range(len(_DECODE_CASES)))
def test_decode_attention_matches_float64_under_the_interpreter(interpreted: dict, case: int) -> None:
    dtype_name, num_q_heads, _, head_dim, kv_lens, splits = _DECODE_CASES[case][:6]
    results = interpreted["decode"][case]
    assert [r["splits"] for r in results] == splits
    for r in results:
        assert r["shape"] == [len(kv_lens), num_q_heads, head_dim] and r["dtype"] == f"torch.{dtype_name}", r
        assert r["into_out"] and r["finite"] and r["excess"] <= 0, r


@pytest.mark.parametrize("case", range(len(_ROPE_CASES)))
def test_rope_append_matches_apply_rope_and_append_kv_under_the_interpreter(interpreted: dict, case: int) -> None:
    r = interpreted["rope"][case]
    assert r["q_excess"] <= 0 and r["cache_excess"] <= 0, r
    assert r["others_untouched"] and r["kv_columns_untouched"], r


def test_graph_step_helper_is_correct_under_the_interpreter(interpreted: dict) -> None:
    """The eager half of the GPU graph test, on CPU: rope_append then decode_attention with padding rows."""
    assert len(interpreted["graph_step"]) == 2 and max(interpreted["graph_step"]) <= 0, interpreted["graph_step"]

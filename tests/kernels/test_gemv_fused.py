"""kernels.gemv_fused: the fused one-row GEMVs against the unfused float64 composition, under Triton's CPU
interpreter (tests/kernels/triton_interpreter.py) and on CUDA in the `gpu` tests.

Tolerance: as tests/kernels/test_gemv.py (fp32 sums, one final rounding), plus one rounding of the
intermediate that the fused kernel rounds as the unfused kernels do (the matmul output before SiLU or the
residual add): rtol 2**-6 for bf16 on the interpreter, which truncates where the GPU rounds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pie_server.kernels.gemv as gemv_module
from pie_server.kernels import gemv_fused
from tests.kernels.triton_interpreter import run_interpreted

ATOL = 2e-3


def _reference(kind: str, x: torch.Tensor, nw: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float64 result, the scale its error is relative to: the magnitudes of the terms whose rounded
    values the kernel combines, as a sum can cancel)."""
    x64, w64 = x.double(), w.double()
    b64 = None if b is None else b.double()
    if kind == "add":
        y = F.linear(x64, w64, b64)
        return residual.double() + y, residual.double().abs() + y.abs()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    y = F.linear(normed, w64, b64)
    if kind == "norm":
        return y, y.abs()
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up, (gate.abs() + 1) * up.abs()  # |d(silu(g) up)/dg| <= 1.1 |up|


_SCRIPT = r"""
import json, sys
import torch
from pie_server.kernels import gemv_fused
from tests.kernels.test_gemv_fused import _reference
torch.manual_seed(0)
results = []
for kind, dtype_name, n, k, with_bias in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    x = torch.randn(1, k, dtype=dtype) * 3
    nw = (torch.rand(k) + 0.5).to(dtype)
    w = (torch.randn(n, k) * k ** -0.5).to(dtype)
    b = torch.randn(n, dtype=dtype) if with_bias else None
    residual = torch.randn(1, n // 2 if kind == "gated" else n, dtype=dtype)
    if kind == "norm":
        y = gemv_fused.rms_norm_gemv(x, nw, 1e-5, w, b)
    elif kind == "gated":
        y = gemv_fused.rms_norm_gated_gemv(x, nw, 1e-5, w, b)
    else:
        kept = residual.clone()
        y = gemv_fused.gemv_add_(x, w, b, residual)
        assert y is residual
        residual = kept
    ref, scale = _reference(kind, x, nw, w, b, residual)
    results.append(dict(case=[kind, dtype_name, n, k, with_bias], dtype=str(y.dtype), shape=list(y.shape),
                        err=(y.double() - ref).abs().tolist(), scale=scale.tolist()))
print(json.dumps(results))
"""
_CASES = [  # (kind, dtype, N, K, bias)
    ("norm", "bfloat16", 96, 576, False),  # SmolLM2-like K: one masked K step
    ("norm", "float16", 40, 2048, True),  # K tiled exactly
    ("gated", "bfloat16", 64, 576, False),
    ("gated", "float16", 34, 300, True),  # odd output count, masked tail
    ("add", "bfloat16", 50, 1536, False),
    ("add", "float16", 530, 4096, True),  # K blocks of 1024: FUSED_TILE, 8 rows (the last block clamped)
    ("gated", "bfloat16", 1060, 2048, False),  # FUSED_TILE gated: 4 gate and 4 up rows per program
]


@pytest.mark.skipif(gemv_module.triton is None,
                    reason="Triton is not installed (`make test` installs it; `pip install -e .[dev]` does not)")
def test_fused_kernels_match_float64_reference_under_the_interpreter() -> None:
    results = run_interpreted(_SCRIPT, _CASES)
    assert len(results) == len(_CASES)
    for r in results:
        kind, dtype_name, n = r["case"][:3]
        assert r["shape"] == [1, n // 2 if kind == "gated" else n] and r["dtype"] == f"torch.{dtype_name}"
        rtol = 2.0 ** -6 if dtype_name == "bfloat16" else 2.0 ** -9
        err, scale = torch.tensor(r["err"]), torch.tensor(r["scale"])
        assert bool((err <= ATOL + rtol * scale).all()), (r["case"], float((err - rtol * scale).max()))


def test_fused_config_refuses_what_the_kernel_cannot_take() -> None:
    x, w = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert gemv_fused.fused_config(torch.randn(2, 64, dtype=torch.bfloat16), w) is None  # two rows
    assert gemv_fused.fused_config(x.float(), w.float()) is None  # float32
    assert gemv_fused.fused_config(x, torch.randn(33, 64, dtype=torch.bfloat16), gated=True) is None  # odd 2N


def test_bad_shapes_raise_before_any_launch() -> None:
    x, w = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="norm weight"):
        gemv_fused.rms_norm_gemv(x, torch.ones(32, dtype=torch.bfloat16), 1e-5, w)
    with pytest.raises(ValueError, match="residual"):
        gemv_fused.gemv_add_(x, w, None, torch.zeros(1, 31, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="no fused GEMV"):  # CPU tensors outside the interpreter
        gemv_fused.rms_norm_gemv(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, w)


# -- on CUDA (by hand on the GPU machine) --------------------------------------------------------------

_GPU_SHAPES = [(6144, 4096), (28672, 4096), (4096, 14336), (960, 576), (3072, 576), (576, 1536)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", _GPU_SHAPES)
@pytest.mark.parametrize("kind", ["norm", "gated", "add"])
def test_fused_kernels_on_cuda(kind: str, n: int, k: int) -> None:
    torch.manual_seed(n + k)
    dtype = torch.bfloat16
    x = torch.randn(1, k, device="cuda", dtype=dtype) * 3
    nw = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
    residual = torch.randn(1, n // 2 if kind == "gated" else n, device="cuda", dtype=dtype)
    ref, scale = _reference(kind, x, nw, w, None, residual)
    if kind == "norm":
        y = gemv_fused.rms_norm_gemv(x, nw, 1e-5, w)
    elif kind == "gated":
        y = gemv_fused.rms_norm_gated_gemv(x, nw, 1e-5, w)
    else:
        y = gemv_fused.gemv_add_(x, w, None, residual.clone())
    err = (y.double() - ref).abs()
    assert bool((err <= ATOL + 2.0 ** -7 * scale).all()), float((err - 2.0 ** -7 * scale).max())


_ROPE_SCRIPT = r"""
import json, sys
import torch
import pie_server.kernels.ops as ops
from pie_server.engine.config import RopeConfig
from pie_server.kernels import gemv_fused
torch.manual_seed(1)
results = []
for dtype_name, hq, hkv, d, k, with_bias in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    n = (hq + 2 * hkv) * d
    x, nw = torch.randn(1, k, dtype=dtype) * 3, (torch.rand(k) + 0.5).to(dtype)
    w, b = (torch.randn(n, k) * k ** -0.5).to(dtype), torch.randn(n, dtype=dtype) if with_bias else None
    cos_sin = ops.rope_cos_sin_cache(RopeConfig(theta=10000.0), d, 64)
    cache = torch.randn(5, 2, 4, hkv, d).to(dtype)
    before = cache.clone()
    positions, write_index = torch.tensor([37]), torch.tensor([3, 2])
    q = gemv_fused.rms_norm_qkv_rope_append(x, nw, 1e-5, w, b, positions, cos_sin, cache, write_index, hq, hkv)
    qkv = ops.rms_norm_linear(x.double(), nw.double(), 1e-5, w.double(), None if b is None else b.double())
    rq, rk, rv = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    rq, rk = ops.apply_rope(rq.view(1, hq, d), rk.view(1, hkv, d), positions, cos_sin)
    untouched = before.clone()
    untouched[3, :, 2] = cache[3, :, 2]
    results.append(dict(case=[dtype_name, hq, hkv, d, k, with_bias], q_shape=list(q.shape),
                        q_err=float((q.double() - rq).abs().max()), q_scale=float(rq.abs().max()),
                        k_err=float((cache[3, 0, 2].double() - rk[0]).abs().max()),
                        v_err=float((cache[3, 1, 2].double() - rv.view(hkv, d)).abs().max()),
                        kv_scale=float(max(rk.abs().max(), rv.abs().max())),
                        others_kept=bool(torch.equal(untouched, cache))))
print(json.dumps(results))
"""
_ROPE_CASES = [  # (dtype, Hq, Hkv, D, K, bias)
    ("bfloat16", 4, 2, 16, 576, True),  # the heuristic's small tile: one rotary pair per program
    ("float16", 8, 2, 64, 2048, False),  # FUSED_TILE: 4 rotary pairs per program
]


@pytest.mark.skipif(gemv_module.triton is None,
                    reason="Triton is not installed (`make test` installs it; `pip install -e .[dev]` does not)")
def test_qkv_rope_append_matches_the_unfused_composition_under_the_interpreter() -> None:
    for r in run_interpreted(_ROPE_SCRIPT, _ROPE_CASES):
        dtype_name, hq, _, d = r["case"][:4]
        assert r["q_shape"] == [1, hq, d] and r["others_kept"], r
        rel = 2.0 ** -6 if dtype_name == "bfloat16" else 2.0 ** -9  # q/k/v rounded twice (projection, rotation)
        assert r["q_err"] <= ATOL + rel * r["q_scale"], r
        assert max(r["k_err"], r["v_err"]) <= ATOL + rel * r["kv_scale"], r


def test_qkv_rope_append_rejects_bad_targets() -> None:
    x, nw = torch.randn(1, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    w = torch.randn((2 + 2 * 1) * 8, 64, dtype=torch.bfloat16)  # Hq = 2, Hkv = 1, D = 8
    cos_sin, pos, widx = torch.zeros(16, 8), torch.tensor([0]), torch.tensor([0, 0])
    cache = torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        gemv_fused.rms_norm_qkv_rope_append(x, nw, 1e-5, w[:24], None, pos, cos_sin, cache, widx, 2, 1)
    with pytest.raises(ValueError, match="kv_cache"):
        gemv_fused.rms_norm_qkv_rope_append(x, nw, 1e-5, w, None, pos, cos_sin, cache.float(), widx, 2, 1)
    with pytest.raises(ValueError, match="write_index"):
        gemv_fused.rms_norm_qkv_rope_append(x, nw, 1e-5, w, None, pos, cos_sin, cache, widx[:1], 2, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,k", [(32, 8, 128, 4096), (9, 3, 64, 576)], ids=["llama-3.1-8b", "smollm2"])
def test_qkv_rope_append_on_cuda(hq: int, hkv: int, d: int, k: int) -> None:
    import pie_server.kernels.ops as ops
    from pie_server.engine.config import RopeConfig
    torch.manual_seed(k)
    dtype, n = torch.bfloat16, (hq + 2 * hkv) * d
    x, nw = torch.randn(1, k, device="cuda", dtype=dtype) * 3, (torch.rand(k, device="cuda") + 0.5).to(dtype)
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
    cos_sin = ops.rope_cos_sin_cache(RopeConfig(theta=500000.0), d, 4096, "cuda")
    cache = torch.randn(9, 2, 16, hkv, d, device="cuda").to(dtype)
    before = cache.clone()
    positions, write_index = torch.tensor([1234], device="cuda"), torch.tensor([7, 5], device="cuda")
    q = gemv_fused.rms_norm_qkv_rope_append(x, nw, 1e-5, w, None, positions, cos_sin, cache, write_index, hq, hkv)
    qkv = ops.rms_norm_linear(x.double(), nw.double(), 1e-5, w.double())
    rq, rk, rv = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    rq, rk = ops.apply_rope(rq.view(1, hq, d), rk.view(1, hkv, d), positions, cos_sin)
    assert (q.double() - rq).abs().max() <= ATOL + 2.0 ** -7 * rq.abs().max()
    assert (cache[7, 0, 5].double() - rk[0]).abs().max() <= ATOL + 2.0 ** -7 * rk.abs().max()
    assert (cache[7, 1, 5].double() - rv.view(hkv, d)).abs().max() <= ATOL + 2.0 ** -7 * rv.abs().max()
    before[7, :, 5] = cache[7, :, 5]
    assert torch.equal(before, cache), "only the token's slot is written"

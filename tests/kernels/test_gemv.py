"""kernels.gemv: the launch-config heuristic, input validation and supports() everywhere; the kernel itself
under Triton's CPU interpreter where Triton is installed, and on CUDA in the `gpu` tests (run by hand on the
GPU machine: `python -m pytest -m gpu tests/kernels/test_gemv.py`).

Tolerance: inputs are exact in their dtype and both gemv and the float64 reference sum exactly-representable
products, gemv in fp32. Its error is the final rounding to the output dtype (at most half an ulp: 2**-9
relative for bf16, 2**-12 for fp16) plus the fp32 summation error (about sqrt(K) * 2**-24 * sum |x w|, under
1e-4 here for outputs of order 1). The checks allow twice the rounding (rtol 2**-8 / 2**-11) plus atol 1e-3.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pie_server.kernels.gemv as gemv_module
from pie_server.kernels.gemv import MAX_M, GemvConfig, candidate_configs, choose_config, gemv, split_layout, supports
from tests.kernels.triton_interpreter import run_interpreted

H100_SMS = 132
# (N, K) of the decode matmuls the kernel is for: Llama-3.1-8B and SmolLM2-135M (qkv, o, gate_up, down, lm_head).
MODEL_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                (960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
ODD_SHAPES = [(1000, 600), (7, 4100), (1, 16), (333, 1000)]
RTOL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
ATOL = 1e-3


def _has_triton() -> bool:
    return gemv_module.triton is not None


# -- the launch config (CPU) ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [dict(block_n=3, block_k=64), dict(block_n=0, block_k=64),
                                    dict(block_n=4, block_k=8), dict(block_n=64, block_k=1024),
                                    dict(block_n=4, block_k=64, split_k=0), dict(block_n=4, block_k=64, num_warps=3),
                                    dict(block_n=4, block_k=64, num_stages=0)])
def test_config_rejects_bad_values(fields: dict) -> None:
    with pytest.raises(ValueError):
        GemvConfig(**fields)


@pytest.mark.parametrize("n,k", MODEL_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("m", range(1, MAX_M + 1))
def test_choose_config_is_valid_and_deterministic(m: int, n: int, k: int) -> None:
    config = choose_config(m, n, k, H100_SMS)
    choose_config.cache_clear()
    assert choose_config(m, n, k, H100_SMS) == config
    k_per_split, num_splits = split_layout(k, config)
    assert k_per_split % config.block_k == 0 and num_splits <= config.split_k
    if config.mode == "fma":
        assert config.fp32_values_per_thread(m) <= 96, "registers: keep several programs resident per SM"
    if m <= 2 and n * k >= 2 << 20 and any(k % b == 0 for b in (32, 64, 128, 256, 512)):
        assert k % config.block_k == 0, "HBM-bound and a dividing block exists: the hot loop needs no K mask"


def test_choose_config_uses_fma_up_to_two_rows_and_tensor_cores_beyond() -> None:
    for n, k in MODEL_SHAPES:
        assert [choose_config(m, n, k, H100_SMS).mode for m in range(1, MAX_M + 1)] == ["fma"] * 2 + ["dot_swapped"] * 6


@pytest.mark.parametrize("n,k", [s for s in MODEL_SHAPES if s[0] >= 4096])
def test_choose_config_fills_the_gpu_for_llama_shapes(n: int, k: int) -> None:
    """Several programs per SM for every large matmul at M = 1 (the bandwidth needs many loads in flight)."""
    config = choose_config(1, n, k, H100_SMS)
    assert config.num_programs(n) >= 3 * H100_SMS


def test_choose_config_splits_k_only_when_rows_are_few() -> None:
    assert choose_config(1, 4096, 14336, H100_SMS).split_k == 1
    assert choose_config(8, 4096, 14336, H100_SMS).split_k == 1  # 64 row blocks of 64: enough
    few_rows = choose_config(1, 64, 8192, H100_SMS)
    assert few_rows.split_k > 1 and few_rows.num_programs(64) >= H100_SMS
    assert choose_config(8, 576, 1536, H100_SMS).split_k > 1  # 9 row blocks of 64


@pytest.mark.parametrize("k", [16, 100, 576, 600, 4096, 4100, 14336])
@pytest.mark.parametrize("block_k,split_k", [(16, 1), (64, 3), (128, 4), (512, 8), (256, 7)])
def test_split_layout_tiles_k_with_nonempty_splits(k: int, block_k: int, split_k: int) -> None:
    k_per_split, num_splits = split_layout(k, GemvConfig(block_n=4, block_k=block_k, split_k=split_k))
    assert k_per_split % block_k == 0 and 1 <= num_splits <= split_k
    assert num_splits * k_per_split >= k > (num_splits - 1) * k_per_split


def test_candidate_configs_start_with_the_heuristic_and_are_unique() -> None:
    for m, n, k in [(1, 4096, 4096), (8, 128256, 4096), (1, 576, 576), (3, 1000, 600)]:
        candidates = candidate_configs(m, n, k, H100_SMS)
        assert candidates[0] == choose_config(m, n, k, H100_SMS)
        assert len(candidates) == len(set(candidates)) > 8


# -- validation and supports() (CPU) -------------------------------------------------------------------


def test_supports_is_false_on_cpu_tensors() -> None:
    x, w = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert not supports(x, w)


def test_supports_is_false_and_gemv_raises_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv_module, "triton", None)
    monkeypatch.setattr(gemv_module, "_interpreting", lambda: True)  # let CPU tensors past the device check
    x, w = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert not supports(x, w)
    with pytest.raises(RuntimeError, match="Triton"):
        gemv(x, w)


def _bad_inputs(device: str) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    bf = dict(dtype=torch.bfloat16, device=device)
    x, w = torch.randn(2, 64, **bf), torch.randn(32, 64, **bf)
    return [
        ("x not 2-D", torch.randn(64, **bf), w, None),
        ("K mismatch", torch.randn(2, 48, **bf), w, None),
        ("too many rows", torch.randn(MAX_M + 1, 64, **bf), w, None),
        ("no rows", torch.randn(0, 64, **bf), w, None),
        ("float32", x.float(), w.float(), None),
        ("dtype mismatch", x.half(), w, None),
        ("strided weight", x, torch.randn(64, 32, **bf).t(), None),
        ("bias shape", x, w, torch.randn(31, **bf)),
        ("bias dtype", x, w, torch.randn(32, dtype=torch.float32, device=device)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_gemv_rejects_bad_inputs(case: int) -> None:
    name, x, w, bias = _bad_inputs("cpu")[case]
    with pytest.raises(ValueError):
        gemv(x, w, bias)


def test_gemv_rejects_cpu_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        gemv(torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16))


# -- the kernel under Triton's CPU interpreter ---------------------------------------------------------

# The kernel runs in a fresh interpreter (tests/kernels/triton_interpreter.py).
_INTERPRETER_SCRIPT = r"""
import json, sys
import torch, torch.nn.functional as F
from pie_server.kernels.gemv import GemvConfig, gemv
torch.manual_seed(0)
results = []
for dtype_name, m, n, k, cfg in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype) * k ** -0.5, torch.randn(n, dtype=dtype)
    for bias in (None, b):
        y = gemv(x, w, bias, config=None if cfg is None else GemvConfig(*cfg))
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        results.append(dict(case=[dtype_name, m, n, k, cfg, bias is not None], dtype=str(y.dtype), shape=list(y.shape),
                            err=(y.double() - ref).abs().tolist(), ref=ref.abs().tolist()))
print(json.dumps(results))
"""
_INTERPRETER_CASES = [  # (dtype, M, N, K, None = the heuristic's config or GemvConfig's fields)
    ("bfloat16", 1, 100, 576, None),
    ("bfloat16", 3, 37, 600, None),  # masked K tail, rows past N clamped
    ("float16", 8, 64, 256, None),
    ("float16", 1, 33, 300, (4, 64, 3)),  # split-K with a masked tail in the last split
    ("bfloat16", 2, 50, 1024, (8, 128, 4, 4, 1, False)),  # split-K, K tiled exactly, per-step reduction
    ("bfloat16", 5, 31, 100, (4, 32, 2, 4, 1, False)),
    ("float16", 7, 17, 64, (2, 16, 8)),  # one K block per split, every accumulator in use
    ("bfloat16", 6, 9, 48, (16, 16, 1, 4, 1, False)),  # BLOCK_N past N
    ("bfloat16", 4, 40, 200, (16, 64, 1, 4, 2, True, "dot")),  # inputs padded to 16 rows, masked K tail
    ("float16", 8, 70, 256, (32, 64, 2, 4, 2, True, "dot_swapped")),
    ("bfloat16", 3, 20, 512, (16, 128, 3, 4, 2, True, "dot")),  # split-K over uneven splits
]


@pytest.mark.skipif(not _has_triton(),
                    reason="Triton is not installed (`make test` installs it; `pip install -e .[dev]` does not)")
def test_kernel_matches_float64_reference_under_the_interpreter() -> None:
    results = run_interpreted(_INTERPRETER_SCRIPT, _INTERPRETER_CASES)
    assert len(results) == 2 * len(_INTERPRETER_CASES)
    for r in results:
        dtype_name, m, n = r["case"][0], r["case"][1], r["case"][2]
        assert r["shape"] == [m, n] and r["dtype"] == f"torch.{dtype_name}", r["case"]
        # The interpreter casts fp32 to bf16 by truncation (up to one ulp, 2**-7), the GPU rounds to nearest.
        rtol = 2.0 ** -7 if dtype_name == "bfloat16" else RTOL[torch.float16]
        err, ref = torch.tensor(r["err"]), torch.tensor(r["ref"])
        assert bool((err <= ATOL + rtol * ref).all()), (r["case"], float((err - rtol * ref).max()))


# -- the kernel on CUDA (by hand on the GPU machine) ----------------------------------------------------


def _assert_matches_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    excess = (y.double() - ref).abs() - (ATOL + RTOL[x.dtype] * ref.abs())
    assert bool(torch.isfinite(y).all()) and float(excess.max()) <= 0, f"worst excess {float(excess.max()):.3g}"


def _poison_allocator(num_elements: int, device: str = "cuda") -> None:
    """Leaves NaN in the blocks the caching allocator hands out next, so unwritten outputs fail the check."""
    for size in (num_elements, 4 * num_elements):
        torch.full((size,), float("nan"), dtype=torch.float32, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", MODEL_SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_reference_on_cuda(n: int, k: int, m: int, dtype: torch.dtype, with_bias: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k * 7 + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    w = (torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k ** -0.5).to(dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if with_bias else None
    _poison_allocator(m * n)
    y = gemv(x, w, bias)
    _assert_matches_reference(y, x, w, bias)
    assert supports(x, w) == (k % 8 == 0)


# One of each code path: deferred / per-step fma, split-K (with a masked last split), both tl.dot layouts.
_GPU_CONFIGS = [GemvConfig(4, 1024, 1, 8), GemvConfig(2, 256, 1, 4, 1, False), GemvConfig(8, 64, 3, 4),
                GemvConfig(1, 512, 8, 4, 1, False), GemvConfig(64, 128, 1, 4, 4, mode="dot"),
                GemvConfig(64, 256, 1, 4, 4, mode="dot_swapped"), GemvConfig(32, 64, 4, 4, 3, mode="dot_swapped")]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (8, 960, 576), (3, 1000, 600), (5, 200, 4104)])
def test_each_code_path_is_correct_on_cuda(config: GemvConfig, m: int, n: int, k: int) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    _poison_allocator(m * n * config.split_k)
    _assert_matches_reference(gemv(x, w, bias, config=config), x, w, bias)


@pytest.mark.gpu
def test_gemv_replays_in_a_cuda_graph() -> None:
    """Captured once (after a warm-up call compiled it), replayed on new inputs written in place."""
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) * 4096 ** -0.5
    gemv(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, w)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        _assert_matches_reference(y, x, w, None)


@pytest.mark.gpu
def test_gemv_rejects_bad_inputs_on_cuda() -> None:
    for name, x, w, bias in _bad_inputs("cuda"):
        with pytest.raises(ValueError):
            gemv(x, w, bias)
        assert name.startswith("bias") or not supports(x, w), name
    x, w = torch.randn(1, 64, dtype=torch.bfloat16, device="cuda"), torch.randn(32, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight on cpu"):
        gemv(x, w)
    assert not supports(x, w)
    assert supports(x, w.cuda())

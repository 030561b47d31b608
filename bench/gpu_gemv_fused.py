"""The fused one-row GEMVs (kernels/gemv_fused.py) against the plain Triton GEMV on the same matrices, in
weight TB/s: what folding RMSNorm, SiLU-and-mul and the residual add into the matmul costs, and which tile
makes it cheapest.

    python -m bench.gpu_gemv_fused [--shapes llama-3.1-8b] [--sweep]

Per decoder matrix of the shape, its fused kind (qkv: RMSNorm in front; o and down: residual add after;
gate_up: RMSNorm in front, SiLU-and-mul after) next to kernels.gemv on the same weights, each timed as in
bench/gpu_gemv.py (CUDA graphs over weight copies that overflow L2, median replay). --sweep also times
tiles of 2-16 rows x 256-1024 columns at 4 and 8 warps. Results: bench/results/gpu_gemv_fused.json.
"""
from __future__ import annotations

import argparse
import itertools
from typing import Callable

import torch

from bench.common_gpu import MODEL_SHAPES, copy_bandwidth, format_table, save_result
from bench.gpu_gemv import MatmulCase, matrix_shapes, time_per_call_s
from pie_server.kernels import gemv_fused
from pie_server.kernels.gemv import GemvConfig, gemv

KINDS = {"qkv": "norm", "o": "add", "gate_up": "gated", "down": "add"}


def fused_call(kind: str, case: MatmulCase, config: GemvConfig | None) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                     torch.Tensor]:
    norm_weight = torch.rand(case.k, device="cuda", dtype=case.dtype) + 0.5
    num_out = case.n // 2 if kind == "gated" else case.n
    residual = torch.zeros(1, num_out, device="cuda", dtype=case.dtype)
    if kind == "norm":
        return lambda x, w: gemv_fused.rms_norm_gemv(x, norm_weight, 1e-5, w, config=config)
    if kind == "gated":
        return lambda x, w: gemv_fused.rms_norm_gated_gemv(x, norm_weight, 1e-5, w, config=config)
    return lambda x, w: gemv_fused.gemv_add_(x, w, None, residual, config=config)


def sweep_configs() -> list[GemvConfig]:
    configs = []
    for block_n, block_k, warps in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8)):
        if 1024 <= block_n * block_k <= 16384 and block_n * block_k // (32 * warps) <= 64:
            configs.append(GemvConfig(block_n, block_k, 1, warps, 1))
    return configs


def bench_matrix(name: str, matrix: str, n: int, k: int, sweep: bool) -> list[dict]:
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    case = MatmulCase(n, k, torch.bfloat16, l2_bytes, seed=n + k)
    x = case.input(1)
    kind = KINDS[matrix]
    plain = time_per_call_s(case, x, lambda x, w: gemv(x, w))
    rows = [dict(shape=name, matrix=matrix, kind="plain gemv", config="heuristic", us=plain * 1e6,
                 tb_s=case.weight_bytes / plain / 1e12)]
    configs = [None] + (sweep_configs() if sweep else [])
    for config in configs:
        seconds = time_per_call_s(case, x, fused_call(kind, case, config))
        rows.append(dict(shape=name, matrix=matrix, kind=kind, config="heuristic" if config is None else
                         f"{config.block_n}x{config.block_k} w{config.num_warps}", us=seconds * 1e6,
                         tb_s=case.weight_bytes / seconds / 1e12))
    case.release()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b"], choices=list(MODEL_SHAPES))
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    for name in args.shapes:
        for matrix, (n, k) in matrix_shapes(MODEL_SHAPES[name]).items():
            if matrix in KINDS:
                rows.extend(bench_matrix(name, matrix, n, k, args.sweep))
    best = {}
    for r in rows:
        key = (r["shape"], r["matrix"], r["kind"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    table = format_table(["shape", "matrix", "kernel", "config", "us", "weight TB/s"],
                         [[r["shape"], r["matrix"], r["kind"], r["config"], r["us"], r["tb_s"]]
                          for r in rows
                          if r["config"] == "heuristic" or best[(r["shape"], r["matrix"], r["kind"])] is r])
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)\n{table}")
    print("wrote", save_result("gpu_gemv_fused", {"copy_bandwidth_tb_s": bandwidth / 1e12, "rows": rows,
                                                   "table": table}))


if __name__ == "__main__":
    main()

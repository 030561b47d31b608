"""Decode matmuls at small batch: cuBLAS (F.linear) against the Triton gemv kernel, in weight TB/s.

    python -m bench.gpu_gemv [--shapes llama-3.1-8b smollm2-135m] [--matrices qkv o ...] [--m 1 2 4 8] [--sweep]

For every model shape's matrices (qkv, o, gate_up, down, lm_head; bf16 weights [N, K]) and each batch M:
the time of one y = x @ W.T under cuBLAS and under kernels.gemv (its heuristic's config), as microseconds
and weight bytes read per second, and gemv's speed-up. Each is timed as a CUDA graph of back-to-back calls
(no launch gaps), replayed several times; the median replay is reported. The calls rotate over enough
copies of the weight to overflow L2 twice, so every call reads its weight from HBM as a decode step does.
`--sweep` also times every candidate config (kernels.gemv.candidate_configs) per shape and prints the
best one next to the heuristic's pick, to fix the heuristic from one GPU run. Every gemv output is checked
against F.linear (relative error printed). The device-to-device copy bandwidth is measured in the same run.
Results go to bench/results/gpu_gemv.json (bench/results/gpu_gemv_sweep.json with --sweep).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common_gpu import MODEL_SHAPES, copy_bandwidth, format_table, save_result
from pie_server.engine.config import ModelConfig
from pie_server.kernels.gemv import GemvConfig, candidate_configs, choose_config, gemv

MATRICES = ("qkv", "o", "gate_up", "down", "lm_head")
MIN_CALLS_PER_GRAPH = 20


def matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each decoder matmul: the fused qkv and gate_up projections, as the engine stores them."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv": (q + 2 * kv, cfg.hidden_size), "o": (cfg.hidden_size, q),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
            "lm_head": (cfg.vocab_size, cfg.hidden_size)}


class MatmulCase:
    """Weight copies of one (N, K) that together overflow L2 twice, and an input per batch size."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, l2_bytes: int, seed: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.n, self.k = n, k
        self.weight_bytes = n * k * torch.finfo(dtype).bits // 8
        num_copies = min(256, max(1, -(-2 * l2_bytes // self.weight_bytes)))
        # Scaled like a trained layer (std 1/sqrt(K)) so outputs stay O(1) in bf16.
        self.weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k ** -0.5
                        for _ in range(num_copies)]
        self.num_calls = max(MIN_CALLS_PER_GRAPH, num_copies)
        self.dtype = dtype
        self._gen = gen

    def input(self, m: int) -> torch.Tensor:
        return torch.randn(m, self.k, device="cuda", dtype=self.dtype, generator=self._gen)

    def release(self) -> None:
        self.weights.clear()


def time_per_call_s(case: MatmulCase, x: torch.Tensor, matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    num_replays: int = 5) -> float:
    """Median over replays of a graph of case.num_calls back-to-back matmuls, per call."""
    for w in case.weights[:2]:
        matmul(x, w)  # compiles / picks algorithms outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(case.num_calls):
            matmul(x, case.weights[i % len(case.weights)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(num_replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / case.num_calls)
    del graph
    return statistics.median(times)


def relative_error(case: MatmulCase, x: torch.Tensor, config: GemvConfig | None) -> float:
    """||gemv - F.linear|| / ||F.linear|| on the first weight copy (fresh output, no NaN allowed)."""
    ref = F.linear(x, case.weights[0]).float()
    out = gemv(x, case.weights[0], config=config).float()
    err = ((out - ref).norm() / ref.norm()).item()
    return err if err == err else float("inf")


def bench_case(model: str, matrix: str, case: MatmulCase, ms: list[int], sweep: bool) -> tuple[list[dict], list[dict]]:
    rows, sweep_rows = [], []
    for m in ms:
        x = case.input(m)
        cublas_s = time_per_call_s(case, x, F.linear)
        config = choose_config(m, case.n, case.k, torch.cuda.get_device_properties(0).multi_processor_count)
        gemv_s = time_per_call_s(case, x, lambda a, w: gemv(a, w, config=config))
        row = {"model": model, "matrix": matrix, "n": case.n, "k": case.k, "m": m,
               "cublas_us": cublas_s * 1e6, "cublas_tb_s": case.weight_bytes / cublas_s / 1e12,
               "gemv_us": gemv_s * 1e6, "gemv_tb_s": case.weight_bytes / gemv_s / 1e12,
               "speedup": cublas_s / gemv_s, "config": asdict(config), "rel_err": relative_error(case, x, config)}
        rows.append(row)
        if sweep:
            sweep_rows.append(sweep_case(row, case, x))
    return rows, sweep_rows


def sweep_case(row: dict, case: MatmulCase, x: torch.Tensor) -> dict:
    """Times every candidate config; the best is the fastest whose output matches F.linear."""
    timed = []
    for config in candidate_configs(row["m"], case.n, case.k):
        try:
            seconds = time_per_call_s(case, x, lambda a, w: gemv(a, w, config=config), num_replays=3)
            err = relative_error(case, x, config)
        except Exception as exc:  # a config the compiler rejects (e.g. out of resources) is reported, not fatal
            print(f"  {row['matrix']} m={row['m']} {config}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        timed.append({"config": asdict(config), "us": seconds * 1e6, "tb_s": case.weight_bytes / seconds / 1e12,
                      "rel_err": err})
    valid = [t for t in timed if t["rel_err"] < 2e-2]
    best = min(valid, key=lambda t: t["us"]) if valid else None
    return {"model": row["model"], "matrix": row["matrix"], "n": case.n, "k": case.k, "m": row["m"],
            "heuristic": row["config"], "heuristic_us": row["gemv_us"], "best": best, "candidates": timed}


def _config_str(config: dict) -> str:
    kind = config["mode"] if config["mode"] != "fma" else ("fma-d" if config["deferred_reduce"] else "fma-s")
    return (f"{kind} {config['block_n']}x{config['block_k']} s{config['split_k']} "
            f"w{config['num_warps']} st{config['num_stages']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--matrices", nargs="+", default=list(MATRICES), choices=list(MATRICES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time every candidate config per shape")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    bandwidth = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    rows, sweep_rows = [], []
    for model in args.shapes:
        for matrix, (n, k) in matrix_shapes(MODEL_SHAPES[model]).items():
            if matrix not in args.matrices:
                continue
            case = MatmulCase(n, k, dtype, props.L2_cache_size, seed=n * 7 + k)
            case_rows, case_sweep = bench_case(model, matrix, case, args.m, args.sweep)
            rows.extend(case_rows)
            sweep_rows.extend(case_sweep)
            case.release()
            torch.cuda.empty_cache()
    table = format_table(
        ["model", "matrix", "N", "K", "M", "cuBLAS us", "cuBLAS TB/s", "gemv us", "gemv TB/s", "speed-up",
         "config", "rel err"],
        [[r["model"], r["matrix"], r["n"], r["k"], r["m"], r["cublas_us"], r["cublas_tb_s"], r["gemv_us"],
          r["gemv_tb_s"], r["speedup"], _config_str(r["config"]), f"{r['rel_err']:.1e}"] for r in rows])
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); {props.name}\n{table}")
    record = {"copy_bandwidth_tb_s": bandwidth / 1e12, "dtype": args.dtype, "rows": rows, "table": table}
    if args.sweep:
        sweep_table = format_table(
            ["model", "matrix", "M", "heuristic", "us", "best", "best us", "best TB/s", "gain"],
            [[s["model"], s["matrix"], s["m"], _config_str(s["heuristic"]), s["heuristic_us"],
              _config_str(s["best"]["config"]) if s["best"] else "-", s["best"]["us"] if s["best"] else 0.0,
              s["best"]["tb_s"] if s["best"] else 0.0,
              s["heuristic_us"] / s["best"]["us"] if s["best"] else 0.0] for s in sweep_rows])
        print(f"\nsweep (best = fastest candidate matching F.linear)\n{sweep_table}")
        record.update(sweep=sweep_rows, sweep_table=sweep_table)
    record["wall_s"] = time.perf_counter() - started
    path = save_result("gpu_gemv_sweep" if args.sweep else "gpu_gemv", record)
    print(f"wrote {path} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

"""Decode TPOT on the GPU next to the memory-bandwidth floor, random bf16 weights of real model shapes.

    python -m bench.gpu_decode [--shapes llama-3.1-8b smollm2-135m] [--batches 1 64] [--context 1024]
                               [--compare-unfused]

For each shape and batch size: prefill `batch` random prompts of `context` tokens, warm up, then time
`steps` greedy decode steps through Executor.execute (the whole step: host inputs, FlashInfer plan, graph
replay, logits, sampling, the token back on the host). TPOT is the median step. "Pipelined TPOT" is the median
over 5 runs of the mean step of `steps` decode steps each submitted before the previous one's token reaches
the host (the token is fed on the device: DirectGenerator.decode_pipelined), so host work overlaps the GPU;
its floor is taken at the context of those runs. Also reported: the GPU
time of the captured forward alone (CUDA events over back-to-back replays) and the eager (no-graph) TPOT.
Floor = (weights + K/V of every context token) / device-to-device copy bandwidth, measured in this run.
--compare-unfused also runs each shape with EngineConfig.fused_decode=False (FlashInfer attention and the
unfused norm/SiLU/residual kernels in the graphs), in the same process: the A/B of the fused kernels.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from bench.common_gpu import (MODEL_SHAPES, copy_bandwidth, decode_floor_s, format_table, graph_replay_s,
                              save_result)
from pie_server.engine.config import EngineConfig
from pie_server.engine.step import SamplingParams
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor

GREEDY = SamplingParams()
PIPELINED_RUNS = 5


def _median_step_s(gen: DirectGenerator, seqs: list, num_steps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(num_steps):
        started = time.perf_counter()
        gen.step(seqs, GREEDY)
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def _pipelined_step_s(gen: DirectGenerator, seqs: list, num_steps: int) -> float:
    """Median over PIPELINED_RUNS runs of the mean step of num_steps pipelined steps (each run's first
    step waits for nothing and its last one's token is waited for: the run's fill and drain count)."""
    runs = []
    for _ in range(PIPELINED_RUNS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        gen.decode_pipelined(seqs, GREEDY, num_steps)
        runs.append((time.perf_counter() - started) / num_steps)
    return statistics.median(runs)


def bench_shape(name: str, batches: list[int], context: int, steps: int, bandwidth: float,
                fused: bool = True) -> list[dict]:
    cfg = MODEL_SHAPES[name]
    pages_per_seq = -(-(context + (PIPELINED_RUNS + 3) * steps + 32) // 16) + 1
    engine = EngineConfig(device="cuda", dtype="bfloat16", num_pages=max(batches) * pages_per_seq + 8,
                          max_batch_size=max(batches), cuda_graphs=True, max_batch_tokens=65536,
                          fused_decode=fused)
    started = time.perf_counter()
    executor = Executor(cfg, engine)
    setup_s = time.perf_counter() - started
    rows = []
    for batch in batches:
        gen = DirectGenerator(executor, scatter_pages=True)
        prompts = torch.randint(0, cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(batch))
        seqs = [gen.start(p) for p in prompts.tolist()]
        gen.step(seqs, GREEDY)  # prefill
        _median_step_s(gen, seqs, 8)  # warm-up
        mean_context = len(seqs[0].token_ids) + steps // 2  # slots read by the middle timed step
        tpot, times = _median_step_s(gen, seqs, steps)
        pipelined_context = len(seqs[0].token_ids) + PIPELINED_RUNS * steps // 2
        pipelined = _pipelined_step_s(gen, seqs, steps)
        replay = graph_replay_s(executor, batch)
        graphs, executor.decode_graphs = executor.decode_graphs, None
        eager, _ = _median_step_s(gen, seqs, max(8, steps // 4))
        executor.decode_graphs = graphs
        floor = decode_floor_s(cfg, 2, [mean_context] * batch, bandwidth)
        pipelined_floor = decode_floor_s(cfg, 2, [pipelined_context] * batch, bandwidth)
        rows.append({"shape": name, "fused": fused, "batch": batch, "context": context, "steps": steps,
                     "tpot_ms": tpot * 1e3, "pipelined_tpot_ms": pipelined * 1e3, "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3,
                     "graph_replay_ms": replay * 1e3, "eager_tpot_ms": eager * 1e3, "floor_ms": floor * 1e3,
                     "tpot_over_floor": tpot / floor, "pipelined_over_floor": pipelined / pipelined_floor,
                     "pipelined_floor_ms": pipelined_floor * 1e3,
                     "setup_s": setup_s})
        for s in seqs:
            gen.release(s)
    del executor, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def probe_gemm(name: str, batches: list[int], iters: int = 50) -> list[list]:
    """Effective bandwidth of each decoder matmul (weight bytes read per second) under cuBLAS and cuBLASLt."""
    cfg = MODEL_SHAPES[name]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"qkv": (q + 2 * kv, cfg.hidden_size), "o": (cfg.hidden_size, q),
              "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
              "lm_head": (cfg.vocab_size, cfg.hidden_size)}
    rows = []
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for matrix, (n, k) in shapes.items():
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for batch in batches:
                x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
                for _ in range(5):
                    torch.nn.functional.linear(x, weight)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    torch.nn.functional.linear(x, weight)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / iters
                rows.append([library, matrix, batch, seconds * 1e6, weight.numel() * 2 / seconds / 1e12])
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows


def probe_attention(name: str, batches: list[int], context: int, page_size: int = 16, reps: int = 20) -> list[list]:
    """GPU time of one layer's paged decode attention (FlashInfer, CUDA cores vs tensor cores), from a CUDA
    graph of `reps` back-to-back calls, next to the time to read that layer's K/V at copy bandwidth."""
    import flashinfer
    cfg = MODEL_SHAPES[name]
    rows = []
    for batch in batches:
        pages_per_seq = -(-context // page_size)
        num_pages = batch * pages_per_seq
        cache = torch.randn(num_pages, 2, page_size, cfg.num_kv_heads, cfg.head_dim, device="cuda",
                            dtype=torch.bfloat16)
        q = torch.randn(batch, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        indptr = torch.arange(batch + 1, dtype=torch.int32) * pages_per_seq
        indices = torch.randperm(num_pages, dtype=torch.int32).cuda()
        last = torch.full((batch,), context - (pages_per_seq - 1) * page_size, dtype=torch.int32)
        for tensor_cores in (False, True):
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                torch.zeros(128 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=tensor_cores)
            wrapper.plan(indptr, indices, last, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, page_size,
                         q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
            for _ in range(3):
                wrapper.run(q, cache)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    wrapper.run(q, cache)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) * 1e3 / (5 * reps)
            kv_bytes = batch * context * 2 * cfg.num_kv_heads * cfg.head_dim * 2
            rows.append([name, batch, context, "tensor cores" if tensor_cores else "cuda cores", us,
                         kv_bytes / (us * 1e-6) / 1e12])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--compare-unfused", action="store_true",
                        help="also run every shape with fused_decode=False (the A/B of the fused kernels)")
    parser.add_argument("--probe-gemm", action="store_true", help="only time the matmuls (cuBLAS vs cuBLASLt)")
    parser.add_argument("--probe-attention", action="store_true",
                        help="only time one layer's decode attention (FlashInfer CUDA cores vs tensor cores)")
    args = parser.parse_args()
    if args.probe_attention:
        for name in args.shapes:
            print(format_table(["shape", "batch", "context", "kernel", "us per layer", "KV TB/s"],
                               probe_attention(name, args.batches, args.context)))
        return
    if args.probe_gemm:
        for name in args.shapes:
            print(format_table(["library", "matmul", "batch", "us", "weight TB/s"], probe_gemm(name, args.batches)))
        return
    bandwidth = copy_bandwidth()
    rows = []
    for name in args.shapes:
        for fused in (True, False) if args.compare_unfused else (True,):
            rows.extend(bench_shape(name, args.batches, args.context, args.steps, bandwidth, fused))
    table = format_table(
        ["shape", "fused", "batch", "TPOT ms", "pipelined TPOT ms", "floor ms", "TPOT/floor", "pipelined/floor",
         "graph GPU ms", "eager TPOT ms"],
        [[r["shape"], "yes" if r["fused"] else "no", r["batch"], r["tpot_ms"], r["pipelined_tpot_ms"], r["floor_ms"], r["tpot_over_floor"],
          r["pipelined_over_floor"], r["graph_replay_ms"], r["eager_tpot_ms"]] for r in rows])
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)\n{table}")
    path = save_result("gpu_decode", {"copy_bandwidth_tb_s": bandwidth / 1e12, "context": args.context,
                                      "rows": rows, "table": table})
    print("wrote", path)


if __name__ == "__main__":
    main()

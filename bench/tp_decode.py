"""Decode TPOT and throughput at tensor-parallel sizes 1/2/4/8 next to the bandwidth floor, random bf16 weights
of the Llama-3.1-8B and Llama-3.1-70B shapes (engine/executor/tensor_parallel.py).

    python -m bench.tp_decode [--shapes llama-3.1-8b llama-3.1-70b] [--tp 1 2 4 8] [--batches 1 16 64]
                              [--context 1024] [--steps 64] [--no-cuda-graphs]
    python -m bench.tp_decode --device cpu --shapes tiny --tp 1 2 --batches 1 4 --steps 8    # smoke run (gloo)

On the multi-GPU machine (nvidia-h200-x2/x4/x8; TP sizes above the GPU count are skipped). Each (shape, TP)
runs in a child process of its own: a process holds one torch.distributed group, and the GPUs are empty again
for the next run. In it: prefill `batch` random prompts of `context` tokens (chunked), warm up, then
- TPOT: the median of `steps` greedy decode steps through Executor.execute on rank 0 (the whole step: host
  inputs, the step message to the other ranks, plan, graph replay with its all-reduces, the logits gather,
  sampling, the tokens back on the host); throughput = batch / TPOT;
- pipelined TPOT: the mean step of `steps` steps each submitted before the previous one's tokens reach the host.
Floor = what one rank must read per step (1/P of every layer's weights, of the LM head and of the K/V, plus
the replicated norms and the embedding rows looked up) / the device-to-device copy bandwidth measured in the
same child on rank 0's device; the all-reduces are not in it (NVLink time is what TPOT - floor leaves).
A shape whose weights do not fit one rank's GPU at that TP size (70B at TP=1) is skipped.
Results: bench/results/tp_decode.json (CUDA only; the CPU smoke run prints its table).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common_gpu import (MODEL_SHAPES, copy_bandwidth, format_table, kv_bytes_per_token, save_result,
                              weight_bytes_per_step)
from pie_server.engine.config import EngineConfig, ModelConfig, RopeConfig
from pie_server.engine.executor.direct import DirectGenerator, DirectSequence
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.tensor_parallel import start_executor
from pie_server.engine.step import SamplingParams

GREEDY = SamplingParams()
PREFILL_TOKENS_PER_STEP = 8192
SHAPES: dict[str, ModelConfig] = {
    **MODEL_SHAPES,
    "llama-3.1-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        dtype="bfloat16"),
    # For the CPU smoke run: TP 1/2/4 divide its heads, KV heads and MLP width.
    "tiny": ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                        num_kv_heads=4, head_dim=32, max_position_embeddings=4096),
}


def rank_floor_s(cfg: ModelConfig, tp: int, batch: int, context: int, bandwidth: float, elem_bytes: int) -> float:
    """Seconds one rank's step must read at `bandwidth`: its 1/P of the weights and K/V (norms and embedding
    rows, replicated, are a rounding error here and divided too)."""
    total = weight_bytes_per_step(cfg, elem_bytes, batch) + kv_bytes_per_token(cfg, elem_bytes) * context * batch
    return total / tp / bandwidth


def fits(cfg: ModelConfig, tp: int, device: str) -> bool:
    """Whether a rank's weights take at most 85 % of its GPU (the rest: KV pages, activations, graphs)."""
    if device == "cpu":
        return True
    return weight_bytes_per_step(cfg, 2, 0) / tp <= 0.85 * torch.cuda.get_device_properties(0).total_memory


# -- one (shape, TP) run, in a child process ------------------------------------------------------------


def run_one(shape: str, tp: int, batches: list[int], context: int, steps: int, device: str,
            cuda_graphs: bool) -> list[dict[str, Any]]:
    cfg = SHAPES[shape]
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else _cpu_copy_bandwidth()
    pages_per_seq = -(-(context + 3 * steps + 32) // 16) + 1
    engine = EngineConfig(device=device, dtype="bfloat16" if device.startswith("cuda") else "float32",
                          num_pages=max(batches) * pages_per_seq + 8, max_batch_size=max(batches),
                          cuda_graphs=cuda_graphs, tensor_parallel_size=tp)
    started = time.perf_counter()
    executor = start_executor(None, cfg, engine, progress=False)
    setup_s = time.perf_counter() - started
    rows = []
    try:
        for batch in batches:
            rows.append(_measure(executor, cfg, batch, context, steps, bandwidth) | {
                "shape": shape, "tp": tp, "setup_s": setup_s, "copy_bandwidth_tb_s": bandwidth / 1e12,
                "cuda_graphs": cuda_graphs})
    finally:
        executor.close()
    return rows


def _measure(executor: Executor, cfg: ModelConfig, batch: int, context: int, steps: int,
             bandwidth: float) -> dict[str, Any]:
    gen = DirectGenerator(executor)
    prompts = torch.randint(0, cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(batch))
    seqs = [gen.start(p) for p in prompts.tolist()]
    while any(s.num_cached < context for s in seqs):  # chunked prefill, then the first token
        gen.step(seqs, GREEDY, max_tokens_per_seq=max(1, PREFILL_TOKENS_PER_STEP // batch))
    _step_times(gen, seqs, 8)  # warm-up
    middle = len(seqs[0].token_ids) + steps // 2
    times = _step_times(gen, seqs, steps)
    tpot = statistics.median(times)
    pipelined_started = time.perf_counter()
    gen.decode_pipelined(seqs, GREEDY, steps)
    pipelined = (time.perf_counter() - pipelined_started) / steps
    for seq in seqs:
        gen.release(seq)
    floor = rank_floor_s(executor.model_config, executor.engine_config.tensor_parallel_size, batch, middle,
                         bandwidth, executor.dtype.itemsize)
    return {"batch": batch, "context": context, "steps": steps, "tpot_ms": tpot * 1e3,
            "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3, "pipelined_tpot_ms": pipelined * 1e3,
            "tokens_per_s": batch / tpot, "pipelined_tokens_per_s": batch / pipelined,
            "floor_ms": floor * 1e3, "tpot_over_floor": tpot / floor}


def _step_times(gen: DirectGenerator, seqs: list[DirectSequence], num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
        started = time.perf_counter()
        gen.step(seqs, GREEDY)
        times.append(time.perf_counter() - started)
    return times


def _cpu_copy_bandwidth(num_bytes: int = 256 << 20, iters: int = 5) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    started = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    return 2 * num_bytes * iters / (time.perf_counter() - started)


# -- the parent: one child per (shape, TP), then the table --------------------------------------------------


def _run_child(job: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """One (shape, TP) in a child of its own session; its rows come back in a file, not on stdout, which
    the child's worker processes inherit (a worker slow to exit kept a stdout pipe open for minutes)."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "rows.json"
        command = [sys.executable, "-m", "bench.tp_decode", "--one", json.dumps(job | {"result": str(result)})]
        child = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        try:
            code: int | str = child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout_s:.0f} s"
        finally:  # also when this parent is terminated (SIGTERM raises SystemExit: see main)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # stragglers: workers, compilers
            child.wait()
        if result.exists():
            return json.loads(result.read_text())
    print(f"{job['shape']} TP={job['tp']} failed ({code})", file=sys.stderr, flush=True)
    return [{"shape": job["shape"], "tp": job["tp"], "error": str(code)}]


def _table(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if "error" not in r]
    return format_table(
        ["shape", "TP", "batch", "TPOT ms", "pipelined ms", "tok/s", "pipelined tok/s", "floor ms", "TPOT/floor"],
        [[r["shape"], r["tp"], r["batch"], r["tpot_ms"], r["pipelined_tpot_ms"], r["tokens_per_s"],
          r["pipelined_tokens_per_s"], r["floor_ms"], r["tpot_over_floor"]] for r in done])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-3.1-70b"], choices=list(SHAPES))
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--child-timeout", type=float, default=900.0, help="seconds for one (shape, TP) run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child's job (JSON)
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        result = Path(job.pop("result"))
        result.write_text(json.dumps(run_one(**job)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally that kills a child's session
    num_devices = torch.cuda.device_count() if args.device == "cuda" else max(args.tp)
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        for tp in args.tp:
            if tp > num_devices or not fits(SHAPES[shape], tp, args.device):
                print(f"skipping {shape} at TP={tp}: " + ("too few GPUs" if tp > num_devices else "does not fit"))
                continue
            rows.extend(_run_child(dict(shape=shape, tp=tp, batches=args.batches, context=args.context,
                                        steps=args.steps, device=args.device, cuda_graphs=not args.no_cuda_graphs),
                                   args.child_timeout))
            print(_table(rows), flush=True)
            if args.device == "cuda":  # after every child: a later one that hangs loses nothing
                save_result("tp_decode", {"context": args.context, "nccl_nvls_enable": "0", "rows": rows,
                                          "table": _table(rows)})


if __name__ == "__main__":
    main()

"""Host microseconds of the executor's decode submit on the graph path, on any machine: Executor.submit for a
steady pipelined decode step (every row fed from the step before, one plain greedy output each) with the CUDA
graph's replay left out, so only the host's part runs (step inputs, the feed, the graph bucket's padding and
attention plan, the input copies, the outputs' bookkeeping).

    .venv/bin/python -m bench.submit_host [--batches 16 64] [--pages 8] [--calls 2000] [--repeats 7]

Why: on the GPU hosts the engine core's loop is the bound for SmolLM2 at batch 32-64 (a ~1.0 ms step against
~0.9-1.0 ms of host work per cycle, 0.58 of it the executor's submit on an H100 host), so each microsecond of
submit counts. The GPU host runs the same code ~2x slower than the 2-core CPU machine (bench/gpu_host_breakdown.py
measured it there with the replay: build step inputs 0.24 ms at batch 64 against ~0.11 here); the copies here are
CPU tensor copies, not asynchronous pinned ones, so read ratios between trees, not absolute GPU-host numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import timeit

import torch

from bench.common_gpu import MODEL_SHAPES, format_table
from pie_server.engine.config import EngineConfig
from pie_server.engine.executor.cuda_graphs import CudaGraphDecoder, GraphConfig
from pie_server.engine.executor.executor import Executor
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.kernels.flashinfer_attention import AttentionShape

PAGE_SIZE = 16
GREEDY = SamplingParams()


def host_only_executor(shape: str, batch: int, num_pages: int) -> Executor:
    """An Executor on the CPU (the shape's vocabulary and heads, one thin layer: the model never runs) whose decode
    graphs are host-only (CudaGraphDecoder(host_only=True): Triton attention's plan, the head, no replay)."""
    config = dataclasses.replace(MODEL_SHAPES[shape], hidden_size=64, intermediate_size=64, num_layers=1,
                                 dtype="float32")
    executor = Executor(config, EngineConfig(page_size=PAGE_SIZE, num_pages=num_pages, max_batch_size=batch))
    graph_config = GraphConfig(max_batch_size=batch, max_pages_per_step=num_pages + batch, head=True)
    attention_shape = AttentionShape(config.num_heads, config.num_kv_heads, config.head_dim, torch.bfloat16)
    executor.decode_graphs = CudaGraphDecoder(executor.model, executor.kv.layers, attention_shape, PAGE_SIZE,
                                              graph_config, host_only=True)
    return executor


def steady_batches(batch: int, pages: int) -> list[Batch]:
    """PAGE_SIZE steps of a steady decode: positions advance, page tuples are passed on, rows fed (but in the
    first)."""
    page_lists = [tuple(range(b * pages, (b + 1) * pages)) for b in range(batch)]
    outputs = (OutputSpec(0, GREEDY),)
    return [Batch(forwards=[ForwardCommand([0], [(pages - 1) * PAGE_SIZE + step], page_lists[b], step + 1, outputs,
                                           None, TokenRef(b) if step else None) for b in range(batch)])
            for step in range(PAGE_SIZE)]


def measure(shape: str, batch: int, pages: int, calls: int, repeats: int) -> float:
    """Median over repeats of the mean us per submit."""
    executor = host_only_executor(shape, batch, batch * pages + 8)
    batches = steady_batches(batch, pages)
    executor.submit(batches[0])  # a step before: the rest take its tokens
    step = iter(range(1 << 62))

    def submit() -> None:
        executor.submit(batches[1 + next(step) % (PAGE_SIZE - 1)])
    return statistics.median(timeit.repeat(submit, number=calls, repeat=repeats)) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [[str(b), f"{measure(args.shape, b, args.pages, args.calls, args.repeats):.1f}"] for b in args.batches]
    print(f"{args.shape}, {args.pages} pages per row, executor submit on the host, replay left out:")
    print(format_table(["batch", "submit us (median of means)"], rows))


if __name__ == "__main__":
    main()

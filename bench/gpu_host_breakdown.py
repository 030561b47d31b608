"""Where the executor's host time goes in pipelined decode steps: each part of Executor.submit timed on the host
(perf_counter around the calls), next to the mean step and the captured graph's GPU time.

    python -m bench.gpu_host_breakdown [--shape smollm2-135m] [--batches 16 64] [--context 512] [--steps 200]
        [--device cuda] [--save NAME]

The question it answers: a SmolLM2-shaped decode step of 64 sequences is ~2 ms of GPU work, yet the pipelined
step took ~3.1 ms with the executor alone (bench/gpu_decode.py) and ~4 ms under HTTP load; which host work is
it? Each row is host milliseconds per step spent inside that call (parts nest: `graph forward` holds `attention
plan` and `graph inputs`). Sequences start with `context - 1` slots already "cached" (their K/V left as the pool
holds it: speed does not depend on values), so no prefill kernel is needed. Random bf16 weights (float32 on CPU,
where the same parts run eagerly and only the control flow is checked).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import torch

from bench.common_gpu import MODEL_SHAPES, format_table, graph_replay_s, save_result
from pie_server.engine.config import EngineConfig
from pie_server.engine.executor import cuda_graphs, executor as executor_module
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.pending import PendingStep
from pie_server.engine.executor.sampler import Sampler
from pie_server.engine.step import SamplingParams
from pie_server.kernels import flashinfer_attention, triton_attention

GREEDY = SamplingParams()


class Timers:
    """Host seconds per named part, summed over a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
        return timed


@contextlib.contextmanager
def patched(timers: Timers, executor: Executor) -> Iterator[None]:
    """Times the parts of Executor.submit (module functions, the executor's objects, and the attention backends'
    plan, whichever class each graph bucket uses)."""
    targets: list[tuple[Any, str, str]] = [
        (executor_module, "build_step_inputs", "build step inputs"),
        (Executor, "submit", "submit (all)"),
        (Executor, "_feed_rows", "feed rows"),
        (executor.model, "logits", "LM head"),
        (Sampler, "launch", "sampler launch"),
        (PendingStep, "result", "result (waits for the GPU)"),
        (cuda_graphs, "pinned", "graph inputs"),
        (flashinfer_attention, "build_host_metadata", "attention host metadata"),
        (triton_attention, "build_host_metadata", "attention host metadata"),
    ]
    if flashinfer_attention.flashinfer is not None:
        targets.append((flashinfer_attention.flashinfer.BatchDecodeWithPagedKVCacheWrapper, "plan",
                        "FlashInfer's decode plan"))
    graphs = executor.decode_graphs
    if graphs is not None:
        targets.append((type(graphs), "forward", "graph forward"))
        for backend in {type(entry.attention) for entry in graphs._graphs.values()}:
            targets.append((backend, "plan", f"attention plan ({backend.__name__})"))
    saved = [(owner, attr, owner.__dict__.get(attr)) for owner, attr, _ in targets]  # None: inherited
    for owner, attr, name in targets:
        setattr(owner, attr, timers.wrap(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, original in saved:
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def _ready_sequences(gen: DirectGenerator, batch: int, context: int, vocab_size: int) -> list:
    """Sequences with context - 1 cached slots and one token to feed (no prefill)."""
    return [gen.start_cached([(b * 7919 + i) % vocab_size for i in range(context)]) for b in range(batch)]


def measure(executor: Executor, batch: int, context: int, steps: int, runs: int = 3) -> dict[str, Any]:
    vocab_size = executor.model_config.vocab_size
    per_run = []
    for _ in range(runs + 1):  # the first run warms up
        gen = DirectGenerator(executor)
        seqs = _ready_sequences(gen, batch, context, vocab_size)
        timers = Timers()
        if executor.device.type == "cuda":
            torch.cuda.synchronize()
        with patched(timers, executor):
            started = time.perf_counter()
            gen.decode_pipelined(seqs, GREEDY, steps)
            wall = time.perf_counter() - started
        per_run.append((wall, dict(timers.seconds)))
        for seq in seqs:
            gen.release(seq)
    per_run = per_run[1:]
    step_ms = statistics.median(wall for wall, _ in per_run) / steps * 1e3
    names = sorted({name for _, parts in per_run for name in parts})
    parts_ms = {name: statistics.median(parts.get(name, 0.0) for _, parts in per_run) / steps * 1e3
                for name in names}
    gpu = graph_replay_s(executor, batch)
    return {"batch": batch, "context": context, "steps": steps, "step_ms": step_ms,
            "graph_gpu_ms": None if gpu is None else gpu * 1e3, "parts_ms": parts_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--save", default=None, help="write bench/results/SAVE.json")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    pages_per_seq = -(-(args.context + args.steps + 1) // 16) + 1
    engine = EngineConfig(device=args.device, dtype="bfloat16" if cuda else "float32",
                          num_pages=max(args.batches) * pages_per_seq + 8, max_batch_size=max(args.batches),
                          cuda_graphs=cuda, piecewise_graphs=False, max_batch_tokens=4096)
    executor = Executor(MODEL_SHAPES[args.shape], engine)
    rows = [measure(executor, batch, args.context, args.steps) for batch in args.batches]
    names = sorted({name for row in rows for name in row["parts_ms"]}, key=lambda n: -rows[-1]["parts_ms"].get(n, 0))
    gpu_ms = ["-" if row["graph_gpu_ms"] is None else f"{row['graph_gpu_ms']:.3f}" for row in rows]
    table = [["step (wall)", *(f"{row['step_ms']:.3f}" for row in rows)], ["graph GPU time", *gpu_ms]]
    table += [[name, *(f"{row['parts_ms'].get(name, 0.0):.3f}" for row in rows)] for name in names]
    print(f"{args.shape}, context {args.context}, {args.steps} pipelined steps, host ms per step:")
    print(format_table(["part", *(f"batch {row['batch']}" for row in rows)], table))
    if args.save:
        save_result(args.save, {"shape": args.shape, "rows": rows})


if __name__ == "__main__":
    main()

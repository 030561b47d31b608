"""Steps with prefill tokens on the GPU: eager against piecewise CUDA graphs (engine/executor/piecewise_graphs.py).

Steps that are not plain decodes run all but attention from per-layer graphs when they hold at most 512 tokens:
an agent appending a tool's answer, a chat request's new turn, a prompt chunk beside running decodes. Each
shape times, through Executor.execute (host work, the forward, greedy sampling of every sequence's last token,
the tokens back on the host), median of --steps steps after warm-up, in one process:

- append T: one sequence at --context tokens appends T tokens;
- mixed B: one sequence appends 32 tokens beside B sequences decoding one token each (all at --context);
- decode B: B sequences decode one token each (the decode graphs; the reference a mixed step is compared to).

Random bf16 weights of real shapes (speed does not depend on values; K/V left at zero), FlashInfer attention.

    python -m bench.gpu_mixed_steps --shapes smollm2-135m llama-3.1-8b --save gpu_mixed_steps_h200
"""
from __future__ import annotations

import argparse
import functools
import gc
import time

import torch

from bench.common_gpu import MODEL_SHAPES, device_info, format_table, save_result
from bench.timing import median_ms
from pie_server.engine.config import EngineConfig
from pie_server.engine.executor.executor import Executor
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams

GREEDY = SamplingParams()
PAGE_SIZE = 16


def _command(seq: int, context: int, num_new: int, pages_per_seq: int) -> ForwardCommand:
    """Sequence `seq` (pages seq * pages_per_seq ...) adding num_new tokens that end at position context."""
    num_pages = -(-context // PAGE_SIZE)
    return ForwardCommand(token_ids=[seq % 1000 + 1] * num_new, positions=list(range(context - num_new, context)),
                          page_ids=list(range(seq * pages_per_seq, seq * pages_per_seq + num_pages)),
                          last_page_len=(context - 1) % PAGE_SIZE + 1,
                          outputs=[OutputSpec(index=num_new - 1, sampling=GREEDY)])


def _scenarios(args: argparse.Namespace, pages_per_seq: int) -> list[tuple[str, int, Batch]]:
    ctx = args.context
    out = [(f"append {t}", t, Batch(forwards=[_command(0, ctx + t, t, pages_per_seq)])) for t in args.append]
    for b in args.batch:
        decodes = [_command(1 + i, ctx, 1, pages_per_seq) for i in range(b)]
        out.append((f"mixed {b}", 32 + b, Batch(forwards=[_command(0, ctx + 32, 32, pages_per_seq), *decodes])))
        out.append((f"decode {b}", b, Batch(forwards=decodes)))
    return out


def bench_shape(name: str, args: argparse.Namespace) -> list[dict]:
    cfg = MODEL_SHAPES[name]
    pages_per_seq = -(-(args.context + max(args.append + [32])) // PAGE_SIZE)
    engine = EngineConfig(device="cuda", dtype="bfloat16", page_size=PAGE_SIZE, max_batch_size=max(args.batch) + 1,
                          num_pages=(max(args.batch) + 1) * pages_per_seq, max_batch_tokens=4096)
    started = time.perf_counter()
    executor = Executor(cfg, engine)
    setup_s = time.perf_counter() - started
    pieces = executor.piecewise_graphs
    rows = []
    for label, num_tokens, batch in _scenarios(args, pages_per_seq):
        step = functools.partial(executor.execute, batch)
        graphed_ms = median_ms(step, args.steps, warmup=3)
        executor.piecewise_graphs = None
        eager_ms = median_ms(step, args.steps, warmup=3)
        executor.piecewise_graphs = pieces
        rows.append({"shape": name, "step": label, "tokens": num_tokens, "context": args.context,
                     "graphs_ms": graphed_ms, "eager_ms": eager_ms, "speedup": eager_ms / graphed_ms,
                     "setup_s": setup_s})
    del executor, pieces
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.1-8b"], choices=sorted(MODEL_SHAPES))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--append", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save", default=None, help="write bench/results/SAVE.json")
    args = parser.parse_args()
    rows = [row for name in args.shapes for row in bench_shape(name, args)]
    headers = ["shape", "step", "tokens", "graphs_ms", "eager_ms", "speedup"]
    print(f"device: {device_info()['card']}")
    print(format_table(headers, [[row[h] for h in headers] for row in rows]))
    if args.save:
        print(save_result(args.save, {"rows": rows}))


if __name__ == "__main__":
    main()

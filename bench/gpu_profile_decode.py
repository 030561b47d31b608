"""Where a pipelined decode step spends its GPU time: torch-profiler kernel totals and the idle gaps between GPU
operations, random bf16 weights of a real shape.

    python -m bench.gpu_profile_decode [llama-3.1-8b | smollm2-135m] [BATCH]     (BATCH: 1 by default)

Prefills BATCH 1024-token prompts, warms up, prints the pipelined TPOT without the profiler, then profiles 12
pipelined steps (DirectGenerator.decode_pipelined): GPU span and busy time per step, the largest gaps (a gap
means the GPU waited for the host), and the kernels by total GPU time.
"""
from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common_gpu import MODEL_SHAPES
from pie_server.engine.config import EngineConfig
from pie_server.engine.step import SamplingParams
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor

NUM_STEPS = 12
GREEDY = SamplingParams()


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    cfg = MODEL_SHAPES[name]
    num_pages = batch * (1024 + 16 + 32 + NUM_STEPS + 16) // 16 + batch
    executor = Executor(cfg, EngineConfig(device="cuda", dtype="bfloat16", num_pages=num_pages,
                                          max_batch_size=max(8, batch)))
    gen = DirectGenerator(executor)
    prompts = torch.randint(0, cfg.vocab_size, (batch, 1024), generator=torch.Generator().manual_seed(0)).tolist()
    seqs = [gen.start(prompt) for prompt in prompts]
    for seq in seqs:
        gen.step([seq], GREEDY)
    gen.decode_pipelined(seqs, GREEDY, 16)
    torch.cuda.synchronize()
    started = time.perf_counter()
    gen.decode_pipelined(seqs, GREEDY, 32)
    torch.cuda.synchronize()
    print(f"pipelined TPOT ms {(time.perf_counter() - started) / 32 * 1e3:.3f}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen.decode_pipelined(seqs, GREEDY, NUM_STEPS)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    span = events[-1].time_range.end - events[0].time_range.start
    busy = sum(e.time_range.end - e.time_range.start for e in events)
    print(f"GPU ops {len(events)}; per step: span {span / NUM_STEPS:.0f} us, busy {busy / NUM_STEPS:.0f} us")
    gaps = [(b.time_range.start - a.time_range.end, a.name[:60], b.name[:60]) for a, b in zip(events, events[1:])]
    for gap, before, after in sorted(gaps, reverse=True)[:10]:
        print(f"gap {gap:.0f} us after {before} before {after}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()

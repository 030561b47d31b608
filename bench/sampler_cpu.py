"""Micro-benchmark of the sampler: median ms per Sampler.sample call, greedy vs mixed parameters.

    python bench/sampler_cpu.py                      # N=16, V=49152 on CPU (the default model's shape)
    OMP_NUM_THREADS=1 python bench/sampler_cpu.py    # steadier on a busy 2-core machine
    PYTHONPATH=. python3 bench/sampler_cpu.py --device cuda --rows 256 --vocab 128256   # Llama-3 vocab

Logits are randn * 3 (a fairly peaked distribution); "mixed" is a quarter each of greedy, top-p, top-k with
penalties over a 286-token history, and seeded min-p with logprobs and a logit bias.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.executor.sampler import Sampler


def mixed_specs(num_rows: int, vocab_size: int) -> list[OutputSpec]:
    """A chat-like mix: a quarter each greedy, top-p, top-k + penalties, seeded min-p with logprobs."""
    history = tuple(range(0, min(vocab_size, 2000), 7))
    kinds = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=50, repetition_penalty=1.1, frequency_penalty=0.3,
                       presence_penalty=0.2, prompt_token_ids=history, output_token_ids=history[:64]),
        SamplingParams(temperature=0.8, min_p=0.05, seed=1, num_logprobs=5, logit_bias=((11, 2.0),)),
    ]
    return [OutputSpec(index=0, sampling=kinds[r % len(kinds)]) for r in range(num_rows)]


def median_ms(call: Callable[[], object], device: torch.device, iters: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()  # returns host results, so the device work is finished when it returns
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    logits = torch.randn(args.rows, args.vocab, device=device).mul_(3).to(getattr(torch, args.dtype))
    sampler = Sampler(seed=0)
    greedy = [OutputSpec(index=0, sampling=SamplingParams()) for _ in range(args.rows)]
    cases = {
        "greedy": greedy,
        "temperature 1": [OutputSpec(index=0, sampling=SamplingParams(temperature=1.0))] * args.rows,
        "top-p 0.9": [OutputSpec(index=0, sampling=SamplingParams(temperature=0.7, top_p=0.9))] * args.rows,
        "mixed": mixed_specs(args.rows, args.vocab),
    }
    print(f"device={device} rows={args.rows} vocab={args.vocab} dtype={args.dtype} threads={torch.get_num_threads()}")
    for name, specs in cases.items():
        ms = median_ms(lambda: sampler.sample(logits, specs), device, args.iters)
        print(f"{name:>14}: {ms:8.3f} ms/call (median of {args.iters})")


if __name__ == "__main__":
    main()

"""The programmability tax: the same greedy generations through the default inferlet (Wasm instances on the
runtime + control layer, the path every OpenAI request takes, minus HTTP) vs. the executor driven directly
(DirectGenerator: lockstep batches, no control layer, no Wasm). Target: tax < 3% of TPOT.

    .venv/bin/python bench/programmability_tax.py [--model PATH] [--batch 1 8 32] [--prompt-tokens 64]
        [--max-tokens 64] [--repeats 3] [--json bench/results/programmability_tax.json] [--api-processes 1]

TPOT(direct) = wall time of the decode steps / (max_tokens - 1), prefill excluded. TPOT(inferlet) = per
instance (last text message - first text message) / (max_tokens - 1), median over instances. The baseline
runs on its own executor with the same weights; the two paths alternate (never at the same time) so that
drifting machine load hits both alike. Distinct prompts, so the prefix cache cannot skip work the baseline
does. steps/token: the engine's executor steps per generated token of the batch, prefill included (about
1.0 when every decode step holds the whole batch; 2.0 when the batcher splits it in two).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from pie_server.engine.config import EngineConfig
from pie_server.engine.step import SamplingParams
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.loader import load_model_config, load_weights, resolve_model_dir
from pie_server.engine.runtime.messages import Event, Terminated, Text


def prompts_for(batch: int, prompt_tokens: int, vocab_size: int, repeat: int) -> list[list[int]]:
    """Distinct token sequences (ids from the ordinary part of the vocabulary)."""
    return [[1000 + (7 * i + 13 * j + 101 * repeat) % (vocab_size - 2000) for j in range(prompt_tokens)]
            for i in range(batch)]


def direct_tpot(executor: Executor, prompts: list[list[int]], max_tokens: int, pipelined: bool) -> float:
    """The baseline: the executor driven directly in lockstep, pipelined where the engine pipelines too (each
    step submitted before the last one's tokens reach the host), so the tax counts nothing but the path."""
    gen = DirectGenerator(executor)
    seqs = [gen.start(p) for p in prompts]
    greedy = SamplingParams()
    gen.step(seqs, greedy)  # prefill, first token
    started = time.perf_counter()
    if pipelined:
        gen.decode_pipelined(seqs, greedy, max_tokens - 1)
    else:
        for _ in range(max_tokens - 1):
            gen.step(seqs, greedy)
    elapsed = time.perf_counter() - started
    for seq in seqs:
        gen.release(seq)
    return elapsed / (max_tokens - 1)


async def inferlet_tpot(engine, program_hash: str, prompts: list[list[int]], max_tokens: int) -> float:  # noqa: ANN001
    async def one(prompt: list[int]) -> float:
        args = {"version": 1, "prompts": [{"token_ids": prompt}], "n": 1, "max_tokens": max_tokens,
                "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                             "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                             "logit_bias": [], "num_logprobs": None},
                "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None}
        handle = engine.runtime.launch(program_hash, [json.dumps(args)], "bench")
        stamps: list[float] = []
        while True:
            message = await handle.next_message()
            if isinstance(message, Event) and json.loads(message.json)["type"] == "prompt":
                handle.send("go")
            elif isinstance(message, Text) and message.text:
                stamps.append(time.perf_counter())
            elif isinstance(message, Terminated):
                if not message.ok:
                    raise RuntimeError(message.error)
                break
        return (stamps[-1] - stamps[0]) / (max_tokens - 1)

    return statistics.median(await asyncio.gather(*[one(p) for p in prompts]))


def _start_engine(model: str | None, config: EngineConfig, api_processes: int):  # noqa: ANN202
    """(engine, the core's process or None)."""
    from pie_server.engine.engine import Engine

    if api_processes == 0:
        return Engine.start(model, config, progress=False), None
    import tempfile

    from pie_server.engine.core.process import CoreSpec, start_core
    from pie_server.engine.front import FrontEngine

    process, address = start_core(CoreSpec(model, config, tempfile.mkdtemp(prefix="pie-tax-")))
    return FrontEngine.connect(address), process


def _count_steps(engine) -> list[int]:  # noqa: ANN001
    """Wraps the engine's executor to count its steps (a one-element list, reset by the caller)."""
    count = [0]
    submit = engine.executor.submit  # execute() submits too

    def counted(batch):  # noqa: ANN001, ANN202
        count[0] += 1
        return submit(batch)

    engine.executor.submit = counted
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-pages", type=int, default=512, help="per KV pool (the baseline has its own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--api-processes", type=int, default=0,
                        help="0: the engine in this process; 1: the runtime here, the control layer and its executor "
                             "in an engine-core process (as `pie serve --api-processes 1` runs them)")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    config = EngineConfig(num_pages=args.num_pages, device=args.device)
    model_config = load_model_config(model_dir)

    from pie_server.app.config import DEFAULT_INFERLET_SOURCE
    from pie_server.app.inferlet_build import build_inferlet
    executor = Executor(model_config, config, load_weights(model_dir, getattr(torch, config.resolved_dtype),
                                                           progress=False))
    engine, core = _start_engine(args.model, config, args.api_processes)
    steps = _count_steps(engine) if core is None else [0]  # the core's steps are counted in its own process
    rows = []
    try:
        wasm = build_inferlet(DEFAULT_INFERLET_SOURCE, Path("/tmp/pie-default-inferlet.wasm"))
        program_hash = engine.runtime.load(wasm.read_bytes())
        vocab = model_config.vocab_size
        for batch in args.batch:
            pipelined = config.device != "cpu"  # as ControlConfig.for_engine decides
            direct_tpot(executor, prompts_for(batch, args.prompt_tokens, vocab, 99), 4, pipelined)  # warm-ups
            asyncio.run(inferlet_tpot(engine, program_hash, prompts_for(batch, args.prompt_tokens, vocab, 98), 4))
            directs, inferlets = [], []
            steps[0] = 0
            for r in range(args.repeats):
                directs.append(direct_tpot(executor, prompts_for(batch, args.prompt_tokens, vocab, r), args.max_tokens,
                                           pipelined))
                inferlets.append(asyncio.run(inferlet_tpot(
                    engine, program_hash, prompts_for(batch, args.prompt_tokens, vocab, 10 + r), args.max_tokens)))
            direct, inferlet = statistics.median(directs), statistics.median(inferlets)
            tax = inferlet / direct - 1
            steps_per_token = steps[0] / (args.repeats * args.max_tokens)
            rows.append({"batch": batch, "tpot_direct_ms": 1000 * direct, "tpot_inferlet_ms": 1000 * inferlet,
                         "tax_percent": 100 * tax,
                         "engine_steps_per_token": steps_per_token if core is None else None})
            print(f"batch {batch:>3}: TPOT direct {1000 * direct:7.2f} ms   default inferlet "
                  f"{1000 * inferlet:7.2f} ms   tax {100 * tax:+6.1f}%   steps/token {steps_per_token:.2f}",
                  flush=True)
    finally:
        engine.close()
        if core is not None:
            core.terminate()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

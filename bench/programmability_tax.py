"""The programmability tax: the same greedy generations through the default inferlet (Wasm instances on the
runtime + control layer, the path every OpenAI request takes, minus HTTP) vs. the executor driven directly
(DirectGenerator: lockstep batches, no control layer, no Wasm). Target: tax < 3% of TPOT.

    .venv/bin/python bench/programmability_tax.py [--model PATH] [--batch 1 8 32] [--prompt-tokens 64]
        [--max-tokens 64] [--repeats 3] [--json bench/results/programmability_tax.json] [--api-processes 1]

TPOT(direct) = wall time of the decode steps / (max_tokens - 1), prefill excluded. TPOT(inferlet), two ways:
- span: per instance (last text message - first text message) / (max_tokens - 1), median over instances. The
  instances are instantiated one after another and each runs to its prompt in the front end; the bench holds
  each at its prompt event until all have reached theirs, then lets them all go, so their prefills and decodes
  start together as the baseline's do (`--staggered`: each goes as soon as it is ready, the default before
  2026-12-07; then the first ones' spans hold steps that prefill the later ones' prompts beside their decodes,
  and on the H100 host the stagger of 32-64 instances likely outlasted a 64-token decode, leaving a short or
  empty steady window: not confirmed, the `window` column now says);
- steady: over the window in which every instance decodes (from the last instance's first token to the first
  instance's last one), per instance the time between its first and last token inside the window over their
  count - 1, median over instances: the decode steps of the whole batch, as the baseline times them (its prompts
  are prefilled in one step, before its clock starts). Token times are taken where the front end's generate
  loop accepts each token (a hook on api_generate._accept: text messages cannot be counted as tokens, since a
  token that ends inside a UTF-8 character sends none). The tax is the steady one; the span tax says what
  staggered starts add. `window`: the median tokens per instance inside the steady window (0: it was empty
  and steady fell back to whole spans). The baseline
runs on its own executor with the same weights; the two paths alternate (never at the same time) so that
drifting machine load hits both alike. Distinct prompts, so the prefix cache cannot skip work the baseline
does. steps/token: the engine's executor steps per generated token of the batch, prefill included (about
1.0 when every decode step holds the whole batch; 2.0 when the batcher splits it in two).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch

from pie_server.engine.config import EngineConfig
from pie_server.engine.step import SamplingParams
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.loader import load_model_config, load_weights, resolve_model_dir
from pie_server.engine.runtime import api_generate
from pie_server.engine.runtime.messages import Event, Terminated, Text

# The engine's A/B choices a run records in its JSON when they are set (docs/configuration.md).
CHOICE_VARIABLES = ("PIE_SPECULATION_DEPTH", "PIE_EXECUTOR_PROCESS", "PIE_DECODE_IN_CONTROL", "PIE_EMULATED_DEVICE_MS",
                    "PIE_EMULATED_SUBMIT_MS")


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


@contextlib.contextmanager
def token_clock() -> Iterator[dict[str, list[float]]]:
    """Per instance id, the time each generated token reached the front end's generate loop (runs on the
    runtime's scheduler thread, in this process whatever --api-processes says)."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    accept = api_generate._accept

    def timed(seq, inst, *rest):  # noqa: ANN001, ANN002, ANN202
        times[inst.id].append(time.perf_counter())
        return accept(seq, inst, *rest)

    api_generate._accept = timed
    try:
        yield times
    finally:
        api_generate._accept = accept


class StartTogether:
    """Holds every instance at its prompt event until all have sent theirs: their prefills and decodes then start
    together, as the baseline's do (see the module's doc)."""

    def __init__(self, num_instances: int) -> None:
        self._num_waiting, self._all_here = num_instances, asyncio.Event()

    async def arrive(self) -> None:
        self._num_waiting -= 1
        if self._num_waiting <= 0:
            self._all_here.set()
        await self._all_here.wait()


async def inferlet_tpot(engine, program_hash: str, prompts: list[list[int]],  # noqa: ANN001
                        max_tokens: int, together: bool = True) -> tuple[float, float, float]:
    """(steady TPOT, span TPOT) in seconds and the median tokens per instance inside the steady window (see the
    module's doc). together: the instances start decoding together (StartTogether), else each when it is ready."""
    start = StartTogether(len(prompts)) if together else None
    with token_clock() as token_times:
        spans = await asyncio.gather(*[_one(engine, program_hash, p, max_tokens, start) for p in prompts])
    times = list(token_times.values())
    return steady_tpot(times), statistics.median(spans), window_tokens(times)


async def _one(engine, program_hash: str, prompt: list[int], max_tokens: int,  # noqa: ANN001
               start: StartTogether | None) -> float:
    """One instance's span TPOT (text messages as the client gets them)."""
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
            if start is not None:
                await start.arrive()
            handle.send("go")
        elif isinstance(message, Text) and message.text:
            stamps.append(time.perf_counter())
        elif isinstance(message, Terminated):
            if not message.ok:
                raise RuntimeError(message.error)
            break
    return (stamps[-1] - stamps[0]) / (max_tokens - 1)


def steady_window(token_times: list[list[float]]) -> tuple[float, float]:
    """(opened, closed): from the last instance's first token to the first instance's last one (empty when
    opened > closed)."""
    return max(t[0] for t in token_times), min(t[-1] for t in token_times)


def window_tokens(token_times: list[list[float]]) -> float:
    """Median over instances of their tokens inside the steady window (0 when it is empty: steady_tpot then
    falls back to whole spans)."""
    opened, closed = steady_window(token_times)
    return statistics.median(sum(opened <= t <= closed for t in times) for times in token_times)


def steady_tpot(token_times: list[list[float]]) -> float:
    """Median over instances of the time per token inside the window where all decode (an instance with fewer
    than two tokens there counts its whole span)."""
    opened, closed = steady_window(token_times)
    tpots = []
    for times in token_times:
        inside = [t for t in times if opened <= t <= closed]
        if len(inside) < 2:
            inside = times
        tpots.append((inside[-1] - inside[0]) / (len(inside) - 1))
    return statistics.median(tpots)


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
    parser.add_argument("--staggered", action="store_true",
                        help="each instance decodes as soon as it is ready (before 2026-12-07: the default), instead "
                             "of all together")
    parser.add_argument("--inferlet-only", action="store_true",
                        help="no baseline, only the default inferlet's TPOT: for an engine core without a model "
                             "(PIE_EMULATED_DEVICE_MS=D [PIE_EMULATED_SUBMIT_MS=H] with --api-processes 1)")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    config = EngineConfig(num_pages=args.num_pages, device=args.device)
    model_config = load_model_config(model_dir)

    from pie_server.app.config import DEFAULT_INFERLET_SOURCE
    from pie_server.app.inferlet_build import build_inferlet
    executor = None if args.inferlet_only else Executor(
        model_config, config, load_weights(model_dir, getattr(torch, config.resolved_dtype), progress=False))
    engine, core = _start_engine(args.model, config, args.api_processes)
    steps = _count_steps(engine) if core is None else [0]  # the core's steps are counted in its own process
    rows = []
    try:
        wasm = build_inferlet(DEFAULT_INFERLET_SOURCE, Path("/tmp/pie-default-inferlet.wasm"))
        program_hash = engine.runtime.load(wasm.read_bytes())
        vocab = model_config.vocab_size
        for batch in args.batch:
            pipelined = config.device != "cpu"  # as ControlConfig.for_engine decides
            if executor is not None:  # warm-ups
                direct_tpot(executor, prompts_for(batch, args.prompt_tokens, vocab, 99), 4, pipelined)
            together = not args.staggered
            asyncio.run(inferlet_tpot(engine, program_hash, prompts_for(batch, args.prompt_tokens, vocab, 98), 4,
                                      together))
            directs, steadies, spans, windows = [], [], [], []
            steps[0] = 0
            for r in range(args.repeats):
                if executor is not None:
                    directs.append(direct_tpot(executor, prompts_for(batch, args.prompt_tokens, vocab, r),
                                               args.max_tokens, pipelined))
                steady, span, window = asyncio.run(inferlet_tpot(
                    engine, program_hash, prompts_for(batch, args.prompt_tokens, vocab, 10 + r), args.max_tokens,
                    together))
                steadies.append(steady)
                spans.append(span)
                windows.append(window)
            direct = statistics.median(directs) if directs else float("nan")  # nan: --inferlet-only
            inferlet, span = statistics.median(steadies), statistics.median(spans)
            tax, span_tax = inferlet / direct - 1, span / direct - 1
            steps_per_token = steps[0] / (args.repeats * args.max_tokens)
            rows.append({"batch": batch, "tpot_direct_ms": 1000 * direct if directs else None,
                         "tpot_inferlet_ms": 1000 * inferlet, "tax_percent": 100 * tax if directs else None,
                         "tpot_inferlet_span_ms": 1000 * span, "span_tax_percent": 100 * span_tax if directs else None,
                         "steady_window_tokens": statistics.median(windows),
                         "engine_steps_per_token": steps_per_token if core is None else None})
            print(f"batch {batch:>3}: TPOT direct {1000 * direct:7.2f} ms   default inferlet "
                  f"{1000 * inferlet:7.2f} ms   tax {100 * tax:+6.1f}%   (whole span {1000 * span:7.2f} ms, "
                  f"{100 * span_tax:+6.1f}%)   window {statistics.median(windows):.0f} tok   steps/token "
                  f"{'-' if core is not None else format(steps_per_token, '.2f')}", flush=True)
    finally:
        engine.close()
        if core is not None:
            core.terminate()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        choices = {name: os.environ.get(name) for name in CHOICE_VARIABLES if os.environ.get(name) is not None}
        Path(args.json).write_text(json.dumps({"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                                              "start_together": not args.staggered, "environment": choices,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

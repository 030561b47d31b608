"""Offline throughput on the GPU: N requests of random prompts, fixed output length, ignore_eos, through the
executor with continuous batching, next to Hugging Face transformers on the same GPU and weights.

    python -m bench.gpu_throughput [--shapes llama-3.1-8b smollm2-135m] [--requests 512] [--prompt 512]
                                   [--output 256] [--token-budget 8192] [--hf-requests 64] [--hf-output 128]
                                   [--sync-baseline] [--profile] [--cuda-profile]

The loop here is a minimal scheduler driving the executor directly (no control layer): each step feeds
one token to every decoding sequence, then fills the rest of the token budget with prompt chunks, admitting
waiting requests while their pages (prompt + output, reserved up front) fit. Decode-only steps replay CUDA
graphs. Steps overlap: step N + 1 is submitted (its decodes take step N's tokens on the device, TokenRef)
before the host waits for step N's results; --sync-baseline also runs the loop without overlap. Output tok/s = requests * output / wall time from the first step to the last token.
transformers runs `generate` (greedy, min_new_tokens = max_new_tokens) in batches of --hf-batch, bf16, SDPA
attention, on fewer requests and output tokens to keep the run short (its tok/s would only fall with longer
outputs).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import pstats
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from bench.common_gpu import MODEL_SHAPES, format_table, save_result
from pie_server.engine import gc_pauses
from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.pending import PendingStep
from pie_server.engine.model.llama import random_weights

SEED = 0
_GREEDY = SamplingParams()
_OUTPUTS: dict[int, tuple[OutputSpec, ...]] = {}  # one greedy output at index i, built once per index


def _greedy_output(index: int) -> tuple[OutputSpec, ...]:
    if index not in _OUTPUTS:
        _OUTPUTS[index] = (OutputSpec(index=index, sampling=_GREEDY),)
    return _OUTPUTS[index]


@dataclass
class _Request:
    token_ids: list[int]  # prompt, then outputs as they reach the host
    num_prompt: int
    num_output: int
    page_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens fed to a submitted step
    num_scheduled: int = 0  # outputs asked of submitted steps
    ref: TokenRef | None = None  # where the last scheduled output lies in the step just submitted

    @property
    def is_decoding(self) -> bool:
        return self.num_cached >= self.num_prompt

    @property
    def is_scheduled(self) -> bool:
        return self.num_scheduled >= self.num_output

    @property
    def is_done(self) -> bool:
        return len(self.token_ids) - self.num_prompt >= self.num_output


def _command(req: _Request, num_tokens: int, page_size: int, fed: TokenRef | None) -> ForwardCommand:
    """The next num_tokens of req; fed: its last token is still on the device (the previous step's)."""
    end = req.num_cached + num_tokens
    num_pages = -(-end // page_size)
    wants_token = end >= req.num_prompt
    token_ids = [0] if fed is not None else req.token_ids[req.num_cached:end]
    return ForwardCommand(token_ids=token_ids, positions=range(req.num_cached, end),
                          page_ids=req.page_ids[:num_pages], last_page_len=end - (num_pages - 1) * page_size,
                          outputs=_greedy_output(num_tokens - 1) if wants_token else (), fed_token=fed)


class _Loop:
    """The minimal continuous-batching scheduler: decodes first, then prompt chunks, then admissions."""

    def __init__(self, executor: Executor, prompts: list[list[int]], num_output: int, token_budget: int,
                 max_running: int) -> None:
        self.executor, self.page_size, self.token_budget = executor, executor.info.page_size, token_budget
        pages_per_request = -(-(len(prompts[0]) + num_output) // self.page_size)
        self.pages_per_request = pages_per_request
        self.free_pages = list(range(executor.info.num_pages))
        self.max_running = min(max_running, len(self.free_pages) // pages_per_request)
        self.requests = [_Request(list(p), len(p), num_output) for p in prompts]
        self.waiting = deque(self.requests)
        self.running: list[_Request] = []
        self.num_steps = self.num_decode_steps = 0

    def next_batch(self, overlap: bool) -> tuple[Batch, list[_Request]] | None:
        """The next step over what is known now; with overlap, decodes take the last step's tokens on the
        device (TokenRef) instead of waiting for them."""
        commands, owners, budget = [], [], self.token_budget
        for req in self.running:
            if req.is_decoding and not req.is_scheduled:
                known = len(req.token_ids) > req.num_cached
                if not known and not overlap:
                    continue
                commands.append(_command(req, 1, self.page_size, None if known else req.ref))
                owners.append(req)
                budget -= 1
        for req in [r for r in self.running if not r.is_decoding]:
            if budget <= 0:
                break
            chunk = min(budget, req.num_prompt - req.num_cached)
            commands.append(_command(req, chunk, self.page_size, None))
            owners.append(req)
            budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting.popleft()
            req.page_ids = [self.free_pages.pop() for _ in range(self.pages_per_request)]
            self.running.append(req)
            chunk = min(budget, req.num_prompt)
            commands.append(_command(req, chunk, self.page_size, None))
            owners.append(req)
            budget -= chunk
        if not commands:
            return None
        for b, (req, command) in enumerate(zip(owners, commands)):
            req.num_cached += len(command.token_ids) if command.fed_token is None else 1
            if command.outputs:
                req.num_scheduled += 1
                req.ref = TokenRef(b)
        self.num_steps += 1
        self.num_decode_steps += all(len(c.token_ids) == 1 for c in commands)
        return Batch(forwards=commands, step_id=self.num_steps), owners

    def deliver(self, pending: PendingStep, owners: list[_Request], batch: Batch) -> None:
        for req, command, result in zip(owners, batch.forwards, pending.result().results):
            if result.outputs:
                req.token_ids.append(result.outputs[0].token_id)
        for req in [r for r in self.running if r.is_done]:
            self.free_pages.extend(req.page_ids)
            self.running.remove(req)

    def run(self, overlap: bool) -> None:
        """Steps until every request is done; with overlap, step N + 1 is submitted before N's results."""
        in_flight: tuple[PendingStep, list[_Request], Batch] | None = None
        while self.waiting or self.running:
            planned = self.next_batch(overlap)
            submitted = None
            if planned is not None:
                submitted = (self.executor.submit(planned[0]), planned[1], planned[0])
            if in_flight is not None:
                self.deliver(*in_flight)
            in_flight = submitted
            if in_flight is not None and not overlap:
                self.deliver(*in_flight)
                in_flight = None
        assert in_flight is None


def run_engine(executor: Executor, prompts: list[list[int]], num_output: int, token_budget: int,
               max_running: int, overlap: bool = True) -> tuple[dict, list[list[int]]]:
    """Runs every request to completion; returns the stats and each request's output tokens."""
    loop = _Loop(executor, prompts, num_output, token_budget, max_running)
    torch.cuda.synchronize()
    started = time.perf_counter()
    loop.run(overlap)
    wall = time.perf_counter() - started
    num_out = len(prompts) * num_output
    graphs = executor.decode_graphs
    stats = {"requests": len(prompts), "prompt": len(prompts[0]), "output": num_output, "wall_s": wall,
             "output_tok_s": num_out / wall, "total_tok_s": (num_out + sum(map(len, prompts))) / wall,
             "overlap": overlap, "steps": loop.num_steps, "decode_only_steps": loop.num_decode_steps,
             "graph_replays": graphs.num_replays if graphs is not None else 0, "max_running": loop.max_running,
             "token_budget": token_budget, "num_pages": executor.info.num_pages}
    return stats, [r.token_ids[r.num_prompt:] for r in loop.requests]


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig
    rope = {"rope_type": cfg.rope.rope_type, "rope_theta": cfg.rope.theta}
    if cfg.rope.rope_type == "llama3":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                       rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings)


def run_hf(cfg: ModelConfig, prompts: list[list[int]], num_output: int, batch: int) -> dict:
    from transformers import LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_config(cfg)).eval()
    torch.set_default_dtype(previous)
    missing, unexpected = model.load_state_dict(random_weights(cfg, torch.device("cuda"), torch.bfloat16, SEED),
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.generation_config.eos_token_id = None
    kwargs = dict(max_new_tokens=num_output, min_new_tokens=num_output, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor(prompts[:1], device="cuda"), **{**kwargs, "max_new_tokens": 4,
                                                                     "min_new_tokens": 4})  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert out.shape[1] == ids.shape[1] + num_output
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"requests": len(prompts), "prompt": len(prompts[0]), "output": num_output, "batch": batch,
            "wall_s": wall, "output_tok_s": len(prompts) * num_output / wall}


def cuda_profile(executor: Executor, prompts: list[list[int]], num_output: int, token_budget: int,
                 max_running: int) -> None:
    """Prints the run's GPU kernel time next to its wall time (one stream: what is not kernel time is the GPU
    waiting for the host) and the kernels by total time (names cut to 90 characters)."""
    from torch.profiler import ProfilerActivity, profile

    with gc_pauses.recording() as pauses, profile(activities=[ProfilerActivity.CUDA]) as prof:
        stats, _ = run_engine(executor, prompts, num_output, token_budget, max_running)
    for generation in (0, 1, 2):
        times = [t for g, t in pauses if g == generation]
        print(f"gc generation {generation}: {len(times)} collections, {1e3 * sum(times):.1f} ms in all, longest "
              f"{1e3 * max(times, default=0.0):.1f} ms")
    kernels: dict[str, list[float]] = {}
    spans = []  # (start us, end us, name) of every kernel and copy on the device
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            spans.append((event.time_range.start, event.time_range.end, event.name[:60]))
    total_us = sum(t for _, t in kernels.values())
    _print_gaps(sorted(spans))
    print(f"cuda profile: wall {stats['wall_s']:.2f} s (under the profiler), GPU kernels {total_us / 1e6:.2f} s "
          f"({100 * total_us / 1e6 / stats['wall_s']:.1f} %)")
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {100 * us / total_us:5.1f} %  {us / 1e3:9.1f} ms  {count:7d}x  {name}")


def _print_gaps(spans: list[tuple[float, float, str]], min_gap_us: float = 50.0) -> None:
    """The device's idle time between kernels: the total of gaps over min_gap_us, and the largest ones with the
    kernels on either side."""
    gaps, end = [], spans[0][1] if spans else 0.0
    for i in range(1, len(spans)):
        if spans[i][0] - end > min_gap_us:
            gaps.append((spans[i][0] - end, i))
        end = max(end, spans[i][1])
    print(f"idle gaps over {min_gap_us:.0f} us: {len(gaps)}, {sum(g for g, _ in gaps) / 1e3:.1f} ms in all")
    for gap, i in sorted(gaps, reverse=True)[:12]:
        print(f"  {gap / 1e3:7.2f} ms at {(spans[i][0] - spans[0][0]) / 1e6:6.2f} s  after {spans[i - 1][2]!r}"
              f"  before {spans[i][2]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--max-running", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--hf-requests", type=int, default=64)
    parser.add_argument("--hf-output", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="cProfile the engine run (host hot spots)")
    parser.add_argument("--cuda-profile", action="store_true",
                        help="run the engine once more under torch.profiler: GPU kernel time against wall time, and "
                             "the kernels that take it")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the start-up heap to the garbage collector (the engine freezes it: engine/gc_pauses.py)")
    parser.add_argument("--sync-baseline", action="store_true",
                        help="also run the engine without overlap (each step waits for the previous one's tokens)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the executor's memory plan
    rows = []
    for name in args.shapes:
        cfg = MODEL_SHAPES[name]
        gen = torch.Generator().manual_seed(SEED)
        prompts = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt), generator=gen).tolist()
        engine = EngineConfig(device="cuda", dtype="bfloat16", max_batch_size=args.max_running,
                              max_batch_tokens=args.token_budget, cuda_graphs=True, seed=SEED,
                              gpu_memory_utilization=args.gpu_memory_utilization)
        started = time.perf_counter()
        executor = Executor(cfg, engine)  # random_weights(cfg, seed=SEED), as transformers gets below
        setup_s = time.perf_counter() - started
        warm, _ = run_engine(executor, prompts[:8], 8, args.token_budget, args.max_running)  # first-use costs
        if not args.no_freeze:  # as the engine's processes do after start-up
            gc_pauses.freeze_heap()
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        ours, outputs = run_engine(executor, prompts, args.output, args.token_budget, args.max_running)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        if args.cuda_profile:
            cuda_profile(executor, prompts, args.output, args.token_budget, args.max_running)
        ours["setup_s"], ours["warmup_s"] = setup_s, warm["wall_s"]
        if executor.memory_plan is not None:
            ours["memory_plan"] = executor.memory_plan.describe()
        sync = None
        if args.sync_baseline:
            sync, sync_outputs = run_engine(executor, prompts, args.output, args.token_budget, args.max_running,
                                            overlap=False)
            # bf16 results depend on the batch's make-up, which overlap shifts by a step: not all equal.
            sync["same_outputs_as_overlap"] = sum(a == b for a, b in zip(outputs, sync_outputs)) / len(outputs)
        del executor
        gc.collect()
        torch.cuda.empty_cache()
        hf = run_hf(cfg, prompts[:args.hf_requests], args.hf_output, args.hf_batch) if args.hf_requests else None
        rows.append({"shape": name, "engine": ours, "engine_sync": sync, "transformers": hf})
        print(name, ours, sync, hf, flush=True)
    table = format_table(
        ["shape", "engine out tok/s", "no-overlap out tok/s", "requests x (prompt+output)", "at once", "wall s",
         "transformers out tok/s", "HF requests x (prompt+output), batch"],
        [[r["shape"], r["engine"]["output_tok_s"], r["engine_sync"]["output_tok_s"] if r["engine_sync"] else "-",
          f'{r["engine"]["requests"]} x ({r["engine"]["prompt"]}+{r["engine"]["output"]})',
          r["engine"]["max_running"], r["engine"]["wall_s"],
          r["transformers"]["output_tok_s"] if r["transformers"] else "-",
          f'{r["transformers"]["requests"]} x ({r["transformers"]["prompt"]}+{r["transformers"]["output"]}), '
          f'{r["transformers"]["batch"]}' if r["transformers"] else "-"] for r in rows])
    print(table)
    print("wrote", save_result("gpu_throughput", {"rows": rows, "table": table}))


if __name__ == "__main__":
    main()

"""Host microseconds per sequence per token of the control loop (Controller, no model): N sequences decode T
tokens each over a fake executor that computes nothing, driven two ways:

- forward: a forward per token, the next one submitted from the previous one's result callback (the cheapest
  possible caller: no Wasm, no runtime thread);
- decode: one Controller.decode per sequence (docs/decisions/decoding-in-control.md);
- decode-pipelined: the same with pipelined steps (docs/decisions/pipelined-steps.md: each step submitted before
  the previous one is delivered, decodes fed their token by the executor);
- engine-core: decode-pipelined through the engine core's wire (docs/decisions/engine-core.md): an EngineCore
  serving the Controller and a RemoteControl calling it over ZMQ, both in this process (so the CPU time counts
  both ends: the core's loop, encoding, and the front end's decoding of the token messages);
- grammar-pipelined (with --grammar-model DIR): decode-pipelined under a regex, `[a-z ]+`, with that model's
  tokenizer and vocabulary (the masks of a structured output or an agent's constrained values; the fake
  executor samples the first token the mask allows).

With --device-ms D each step runs D ms on an emulated device (one step at a time, from its submission): the wall
time then shows the host work that runs in series with the device (a step whose decodes all need their tokens first
is delivered before the next one is formed).

    python -m bench.control_loop [--sequences 1 64 256] [--tokens 64] [--repeats 3] [--grammar-model DIR]
        [--grammar-regex R] [--modes ...] [--device-ms D] [--json PATH]

Reports the median over repeats of wall time and process CPU time, each divided by sequences x tokens: what the
control layer costs per token on the host (in series with the GPU unless pipelined).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from bench.imports import without_repo_root
from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import DecodeRequest
from pie_server.engine.core.client import RemoteControl
from pie_server.engine.core.messages import CoreFacts
from pie_server.engine.core.process import core_address_of
from pie_server.engine.core.server import EngineCore
from pie_server.engine.executor.emulated import DeviceClock, EmulatedStep
from pie_server.engine.grammar import GrammarCompiler, GrammarSpec, LazyCompiler
from pie_server.engine.step import CommandResult, OutputSpec, SamplingParams
from pie_server.engine.tokenizer import Tokenizer
from pie_server.engine.types import InstanceId
from tests.engine.control.fake_executor import FakeExecutor

PAGE_SIZE, PROMPT_TOKENS = 16, 16
GREEDY = SamplingParams()


MODES = ("forward", "decode", "decode-pipelined", "engine-core", "grammar-pipelined")
GRAMMAR = GrammarSpec("regex", "[a-z ]+")  # --grammar-regex replaces it


class _DeviceTime:
    """The fake executor with a device (engine/executor/emulated.py's clock): each step runs device_s on it, one
    step after another, from its submission on; its results wait for that (a sleep, which releases the GIL as
    waiting for a GPU does), so host work in series with the device shows."""

    def __init__(self, executor: FakeExecutor, device_s: float) -> None:
        self._executor, self._device = executor, DeviceClock(device_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._executor, name)

    def submit(self, batch: Any) -> EmulatedStep:
        ends_at = self._device.start_step()
        done = self._executor.submit(batch)
        return EmulatedStep(done.step_id, done.result(), ends_at)

    def execute(self, batch: Any) -> Any:
        time.sleep(self._device.step_s)
        return self._executor.execute(batch)


def _controller(num_seqs: int, num_tokens: int, pipeline: bool, grammars: LazyCompiler | None = None,
                vocab_size: int = 1000, device_s: float = 0.0, depth: int = 1) -> Controller:
    pages_per_seq = -(-(PROMPT_TOKENS + num_tokens + 1) // PAGE_SIZE)
    executor: Any = FakeExecutor(num_pages=num_seqs * pages_per_seq + 8, page_size=PAGE_SIZE, simulate_kv=False,
                                 record=False, check=False, vocab_size=vocab_size)
    if device_s:
        executor = _DeviceTime(executor, device_s)
    controller = Controller(executor, ControlConfig(max_batch_size=max(num_seqs, 1),
                                                    max_batch_tokens=max(num_seqs * PROMPT_TOKENS, 256),
                                                    pipeline=pipeline, speculation_depth=depth), grammars)
    controller.start()
    return controller


def _open(controller: Any, num_seqs: int, num_tokens: int) -> list[tuple[InstanceId, list[int]]]:
    pages_per_seq = -(-(PROMPT_TOKENS + num_tokens + 1) // PAGE_SIZE)
    opened = []
    for i in range(num_seqs):
        instance = InstanceId(f"s{i}")
        controller.open_instance(instance)
        opened.append((instance, controller.allocate_pages(instance, pages_per_seq).result(timeout=10)))
    return opened


def run_forward(controller: Controller, opened: list[tuple[InstanceId, list[int]]], num_tokens: int) -> None:
    remaining, done = [len(opened)], threading.Event()
    lock = threading.Lock()

    def submit(instance: InstanceId, pages: list[int], tokens: list[int], context: int, left: int) -> None:
        num_slots = context + len(tokens)
        num_pages = -(-num_slots // PAGE_SIZE)
        future = controller.forward(instance, VirtualForward(
            tokens, list(range(context, num_slots)), pages[:num_pages], num_slots - (num_pages - 1) * PAGE_SIZE,
            [OutputSpec(len(tokens) - 1, GREEDY)]))
        future.add_done_callback(_next(instance, pages, num_slots, left))

    def _next(instance: InstanceId, pages: list[int], context: int, left: int) -> Callable[[Future], None]:
        def on_result(future: Future[CommandResult]) -> None:
            if left > 1:
                submit(instance, pages, [future.result().outputs[0].token_id], context, left - 1)
                return
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
        return on_result

    for instance, pages in opened:
        submit(instance, pages, list(range(1, PROMPT_TOKENS + 1)), 0, num_tokens)
    assert done.wait(timeout=600)


def run_decode(controller: Any, opened: list[tuple[InstanceId, list[int]]], num_tokens: int,
               grammar: GrammarSpec | None = None) -> int:
    """The tokens decoded in all (a grammar that can only end stops its decode early)."""
    streams = [controller.decode(instance, DecodeRequest(
        token_ids=tuple(range(1, PROMPT_TOKENS + 1)), position=0, page_ids=tuple(pages), context_len=0,
        sampling=GREEDY, max_new_tokens=num_tokens, grammar=grammar)) for instance, pages in opened]
    total = 0
    for stream in streams:
        stream.done.result(timeout=600)
        num_decoded = len(stream.drain())
        assert num_decoded == num_tokens or grammar is not None
        total += num_decoded
    return total


def measure(mode: str, num_seqs: int, num_tokens: int, grammar_compiler: tuple[LazyCompiler, int] | None = None,
            grammar: GrammarSpec = GRAMMAR, device_s: float = 0.0, depth: int = 1) -> tuple[float, float]:
    grammars, vocab_size = grammar_compiler if mode == "grammar-pipelined" and grammar_compiler else (None, 1000)
    controller = _controller(num_seqs, num_tokens, pipeline=mode != "forward" and mode != "decode",
                             grammars=grammars, vocab_size=vocab_size, device_s=device_s, depth=depth)
    with contextlib.ExitStack() as stack:
        stack.callback(controller.stop)
        control = stack.enter_context(_through_core(controller)) if mode == "engine-core" else controller
        opened = _open(control, num_seqs, num_tokens)
        wall, cpu = time.perf_counter(), time.process_time()
        if mode == "forward":
            run_forward(control, opened, num_tokens)
            num_decoded = num_seqs * num_tokens
        else:
            num_decoded = run_decode(control, opened, num_tokens, grammar if grammars is not None else None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        for instance, _ in opened:
            control.close_instance(instance)
    per = 1e6 / num_decoded
    return wall * per, cpu * per


@contextlib.contextmanager
def _through_core(controller: Controller) -> Iterator[RemoteControl]:
    with tempfile.TemporaryDirectory() as run_dir:
        facts = CoreFacts(model_name="fake", model_dir=run_dir, vocab_size=1000, info=controller.info,
                          admission_pages=controller.admission.num_pages)
        core = EngineCore(controller, facts, core_address_of(run_dir))
        thread = threading.Thread(target=core.serve_forever, daemon=True)
        thread.start()
        remote = RemoteControl(core_address_of(run_dir), os.getpid(), run_dir, connect_timeout_s=10)
        try:
            yield remote
        finally:
            remote.close()
            core.stop()
            thread.join()
            core.close()


def _grammar_compiler(model_dir: str, grammar: GrammarSpec) -> tuple[LazyCompiler, int]:
    """The model's tokenizer as llguidance's vocabulary, compiled now (not inside a timed run), and its size."""
    with without_repo_root():
        tokenizer = Tokenizer.from_dir(model_dir)
    compiler = GrammarCompiler.for_tokenizer(tokenizer, tokenizer.vocab_size)
    compiler.check(grammar)
    return LazyCompiler(lambda: compiler), tokenizer.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grammar-model", default=None,
                        help="a model folder whose tokenizer the grammar-pipelined mode uses (its vocabulary)")
    parser.add_argument("--grammar-regex", default=GRAMMAR.text,
                        help="the grammar-pipelined mode's regex (a decode that can only end stops early: the figures "
                             "are per token decoded)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: every mode that can run")
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="each step runs this long on an emulated device, one step at a time from its "
                             "submission (what the host does in series with it shows in the wall time)")
    parser.add_argument("--speculation-depth", type=int, choices=[1, 2], default=1,
                        help="pipelined modes: decodes one or two steps ahead (ControlConfig.speculation_depth)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    grammar = GrammarSpec("regex", args.grammar_regex)
    grammar_compiler = _grammar_compiler(args.grammar_model, grammar) if args.grammar_model else None
    modes = args.modes or [m for m in MODES if m != "grammar-pipelined" or grammar_compiler]
    if "grammar-pipelined" in modes and grammar_compiler is None:
        parser.error("grammar-pipelined needs --grammar-model")
    rows = []
    print("| sequences | mode | wall us / seq / token | CPU us / seq / token |\n|---|---|---|---|")
    for num_seqs in args.sequences:
        for mode in modes:
            runs = [measure(mode, num_seqs, args.tokens, grammar_compiler, grammar, args.device_ms / 1e3,
                            args.speculation_depth) for _ in range(args.repeats)]
            wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append({"sequences": num_seqs, "mode": mode, "wall_us": wall, "cpu_us": cpu})
            print(f"| {num_seqs} | {mode} | {wall:.1f} | {cpu:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "control_loop", "command": " ".join(["python -m bench.control_loop", *sys.argv[1:]]),
                       "tokens": args.tokens, "speculation_depth": args.speculation_depth,
                       "cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

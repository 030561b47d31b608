"""Host microseconds per sequence per token of the control loop (Controller, no model): N sequences decode T
tokens each over a fake executor that computes nothing, driven two ways:

- forward: a forward per token, the next one submitted from the previous one's result callback (the cheapest
  possible caller: no Wasm, no runtime thread);
- decode: one Controller.decode per sequence (docs/decisions/decoding-in-control.md);
- decode-pipelined: the same with pipelined steps (docs/decisions/pipelined-steps.md: each step submitted before
  the previous one is delivered, decodes fed their token by the executor);
- engine-core: decode-pipelined through the engine core's wire (docs/decisions/engine-core.md): an EngineCore
  serving the Controller and a RemoteControl calling it over ZMQ, both in this process (so the CPU time counts
  both ends: the core's loop, encoding, and the front end's decoding of the token messages).

    python -m bench.control_loop [--sequences 1 64 256] [--tokens 64] [--repeats 3] [--json PATH]

Reports the median over repeats of wall time and process CPU time, each divided by sequences x tokens: what the
control layer costs per token on the host (in series with the GPU unless pipelined).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import DecodeRequest
from pie_server.engine.core.client import RemoteControl
from pie_server.engine.core.messages import CoreFacts
from pie_server.engine.core.process import core_address_of
from pie_server.engine.core.server import EngineCore
from pie_server.engine.step import CommandResult, OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId
from tests.engine.control.fake_executor import FakeExecutor

PAGE_SIZE, PROMPT_TOKENS = 16, 16
GREEDY = SamplingParams()


MODES = ("forward", "decode", "decode-pipelined", "engine-core")


def _controller(num_seqs: int, num_tokens: int, pipeline: bool) -> Controller:
    pages_per_seq = -(-(PROMPT_TOKENS + num_tokens + 1) // PAGE_SIZE)
    executor = FakeExecutor(num_pages=num_seqs * pages_per_seq + 8, page_size=PAGE_SIZE, simulate_kv=False,
                            record=False, check=False)
    controller = Controller(executor, ControlConfig(max_batch_size=max(num_seqs, 1),
                                                    max_batch_tokens=max(num_seqs * PROMPT_TOKENS, 256),
                                                    pipeline=pipeline))
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


def run_decode(controller: Any, opened: list[tuple[InstanceId, list[int]]], num_tokens: int) -> None:
    streams = [controller.decode(instance, DecodeRequest(
        token_ids=tuple(range(1, PROMPT_TOKENS + 1)), position=0, page_ids=tuple(pages), context_len=0,
        sampling=GREEDY, max_new_tokens=num_tokens)) for instance, pages in opened]
    for stream in streams:
        stream.done.result(timeout=600)
        assert len(stream.drain()) == num_tokens


def measure(mode: str, num_seqs: int, num_tokens: int) -> tuple[float, float]:
    controller = _controller(num_seqs, num_tokens, pipeline=mode != "forward" and mode != "decode")
    with contextlib.ExitStack() as stack:
        stack.callback(controller.stop)
        control = stack.enter_context(_through_core(controller)) if mode == "engine-core" else controller
        opened = _open(control, num_seqs, num_tokens)
        wall, cpu = time.perf_counter(), time.process_time()
        (run_forward if mode == "forward" else run_decode)(control, opened, num_tokens)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        for instance, _ in opened:
            control.close_instance(instance)
    per = 1e6 / (num_seqs * num_tokens)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print("| sequences | mode | wall us / seq / token | CPU us / seq / token |\n|---|---|---|---|")
    for num_seqs in args.sequences:
        for mode in MODES:
            runs = [measure(mode, num_seqs, args.tokens) for _ in range(args.repeats)]
            wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append({"sequences": num_seqs, "mode": mode, "wall_us": wall, "cpu_us": cpu})
            print(f"| {num_seqs} | {mode} | {wall:.1f} | {cpu:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "control_loop", "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

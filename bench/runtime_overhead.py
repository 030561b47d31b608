"""Host overhead of the inferlet runtime: N concurrent instances x K forward calls against a fake control.

Guests (raw component ABI, tests/engine/runtime/wat/), one token and one greedy sampled output per call:
- --api forward-tokens (default): the lean path: register-sampler once, then forward-tokens with flat lists;
- --api forward: the full forward-request record (13-field sampling params per output) on every call.
Execution models (--model), same guest and fake executor:
- async:  engine.runtime (one scheduler thread over wasmtime's async C API);
- thread: one OS thread per instance over wasmtime-py's public, blocking API (a minimal host for the three
          imports the forward guest uses), for comparison.

The fake executor follows the control's adaptive policy: when a step ends, everything pending forms the next
batch; a step takes --step-ms (the "GPU"). Reported (medians over --repeat runs, each run listed too):
- scheduler CPU per call: CPU time of the scheduler thread alone (wasm, host functions, the fake control's
  forward() it calls): the host overhead, the least sensitive to other load on the machine;
- process CPU per call: all threads (adds the fake executor delivering results, the epoch ticker);
- wall per call, batch fullness (mean over batches of batch size / instances alive when it formed).
Under the adaptive policy the instances settle into cohorts that alternate steps (a cohort re-submits while
the other one's step runs), so fullness tends to 1/2 once a round of all instances is shorter than a step,
and to step / (instances x per-call time) while it is longer. --linger-ms tries another policy (wait before
a step until every live instance has a forward pending); docs/decisions/execution-model.md has numbers.
OPENBLAS_NUM_THREADS is set to 1 (numpy comes in through engine.runtime; its idle BLAS pool is no part of
what is measured here).

    python -m bench.runtime_overhead --instances 1000 --calls 100 --step-ms 20 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported (see the docstring)

import wasmtime  # noqa: E402

from pie_server.engine.config import EngineInfo  # noqa: E402
from pie_server.engine.control.api import VirtualForward  # noqa: E402
from pie_server.engine.step import CommandResult, OutputResult  # noqa: E402
from pie_server.engine.runtime.config import ModelInfo, RuntimeConfig  # noqa: E402
from pie_server.engine.types import InstanceId  # noqa: E402

WAT_DIR = ROOT / "tests" / "engine" / "runtime" / "wat"
GUESTS = {"forward": WAT_DIR / "forward_loop.wat", "forward-tokens": WAT_DIR / "forward_tokens_loop.wat"}
GUEST_SETTINGS = {"TEMPERATURE": "0.0", "SAMPLER_OFFSET": "0", "NUM_LOGPROBS_CASE": "0"}
VOCAB = 32000


class BatchingControl:
    """Just enough of api.Control: pages are counters; forwards go through an adaptive fake executor."""

    def __init__(self, step_s: float, linger_s: float = 0.0) -> None:
        self.info = EngineInfo(num_pages=1 << 20, page_size=16, max_context_len=4096, kv_bytes_per_page=1)
        self._step_s = step_s
        self._linger_s = linger_s
        self._cond = threading.Condition()
        self._pending: list[tuple[VirtualForward, Future]] = []
        self._alive = 0
        self._next_page = 0
        self.batches: list[tuple[int, int]] = []  # (batch size, instances alive)
        self._stop = False
        threading.Thread(target=self._executor, daemon=True).start()

    def open_instance(self, instance_id: InstanceId, max_pages: int | None = None) -> None:
        with self._cond:
            self._alive += 1

    def close_instance(self, instance_id: InstanceId) -> None:
        with self._cond:
            self._alive -= 1

    def allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Future:
        future: Future = Future()
        with self._cond:
            first, self._next_page = self._next_page, self._next_page + num_pages
        future.set_result(list(range(first, first + num_pages)))
        return future

    def forward(self, instance_id: InstanceId, command: VirtualForward) -> Future:
        future: Future = Future()
        with self._cond:
            self._pending.append((command, future))
            self._cond.notify()
        return future

    def _executor(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop)
                if self._linger_s:  # a policy experiment, not the control's: wait for every live instance
                    self._cond.wait_for(lambda: len(self._pending) >= self._alive or self._stop, self._linger_s)
                if self._stop:
                    return
                batch, self._pending = self._pending, []
                self.batches.append((len(batch), self._alive))
            if self._step_s:
                time.sleep(self._step_s)
            for command, future in batch:
                token = (command.token_ids[-1] + 1) % VOCAB
                future.set_result(CommandResult(outputs=(OutputResult(token_id=token, logprob=-1.0),)))

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def __getattr__(self, name: str) -> Any:  # calls the guest does not make
        raise NotImplementedError(name)


class RealControl:
    """The engine's own Controller (validation, page tables, batcher with gathering) over the fake executor
    of tests/engine/control/fake_executor.py, which sleeps step_s per step."""

    def __init__(self, step_s: float, instances: int) -> None:
        from tests.engine.control.fake_executor import FakeExecutor
        from pie_server.engine.control.config import ControlConfig
        from pie_server.engine.control.controller import Controller
        self.executor = FakeExecutor(num_pages=2 * instances, page_size=16, vocab_size=VOCAB, step_delay_s=step_s,
                                     simulate_kv=False, check=False)
        self.controller = Controller(self.executor, ControlConfig(max_batch_size=instances,
                                                                  max_batch_tokens=max(instances, 4096)))
        self.controller.start()

    @property
    def batches(self) -> list[tuple[int, int]]:
        """(batch size, instances) per step: fullness here is against all instances of the run."""
        return [(len(b.forwards), self.executor.info.num_pages // 2) for b in self.executor.batches if b.forwards]

    def stop(self) -> None:
        self.controller.stop()


class NullTokenizer:
    def new_decoder(self) -> Any:
        raise NotImplementedError


def run_async(wasm: bytes, control: BatchingControl, instances: int, calls: int) -> dict[str, float]:
    from pie_server.engine.runtime.runtime import Runtime
    model = ModelInfo(name="bench", vocab_size=VOCAB, page_size=16, max_context_len=4096)
    runtime = Runtime(getattr(control, "controller", control), NullTokenizer(), model,  # type: ignore[arg-type]
                      RuntimeConfig(time_budget_s=600))
    program = runtime.load(wasm)
    cpu: list[float] = []
    runtime._scheduler.post(lambda: cpu.append(time.thread_time()))
    start, start_cpu = time.perf_counter(), time.process_time()
    handles = [runtime.launch(program) for _ in range(instances)]
    ends = [h.messages(timeout=600)[-1] for h in handles]
    wall, process_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    done = threading.Event()
    runtime._scheduler.post(lambda: (cpu.append(time.thread_time()), done.set()))
    done.wait(10)
    runtime.close()
    failed = [e for e in ends if not getattr(e, "ok", False)]
    if failed:
        raise SystemExit(f"{len(failed)} instances failed, e.g. {failed[0]}")
    return {"wall_s": wall, "process_cpu_s": process_cpu, "scheduler_cpu_s": cpu[1] - cpu[0]}


def run_threads(wasm: bytes, control: BatchingControl, instances: int, calls: int) -> dict[str, float]:
    """One OS thread per instance, public wasmtime-py API, blocking host functions."""
    from wasmtime.component import Component, Linker
    engine = wasmtime.Engine()
    component = Component(engine, wasm)
    linker = Linker(engine)
    local = threading.local()

    def allocate(store: Any, num_pages: int) -> Any:
        return control.allocate_pages(local.instance_id, num_pages).result()

    def forward(store: Any, request: Any) -> Any:
        command = VirtualForward(token_ids=getattr(request, "token-ids"), positions=request.positions,
                                 page_ids=getattr(request, "page-ids"), last_page_len=getattr(request, "last-page-len"))
        result = control.forward(local.instance_id, command).result()
        output = wasmtime.component.Record()
        for name, value in (("token-id", result.outputs[0].token_id), ("logprob", result.outputs[0].logprob),
                            ("top-logprobs", []), ("distribution", [])):
            setattr(output, name, value)
        return [output]

    with linker.root() as root:
        with root.add_instance("pie:inferlet/kv@0.1.0") as kv:
            kv.add_func("allocate-pages", allocate)
        with root.add_instance("pie:inferlet/forward@0.1.0") as fwd:
            fwd.add_func("forward", forward)
        with root.add_instance("pie:inferlet/messaging@0.1.0") as msg:
            msg.add_func("send", lambda store, text: None)
    errors: list[str] = []

    def instance(index: int) -> None:
        local.instance_id = InstanceId(f"t{index}")
        control.open_instance(local.instance_id)
        try:
            store = wasmtime.Store(engine)
            run = linker.instantiate(store, component).get_func(store, "run")
            if run(store) is not None:
                errors.append("run returned an error")
        except Exception as error:
            errors.append(repr(error))
        finally:
            control.close_instance(local.instance_id)

    threading.stack_size(1 << 20)
    threads = [threading.Thread(target=instance, args=(i,)) for i in range(instances)]
    start, start_cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, process_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if errors:
        raise SystemExit(f"{len(errors)} instances failed, e.g. {errors[0]}")
    return {"wall_s": wall, "process_cpu_s": process_cpu}


def measure(args: argparse.Namespace, wasm: bytes) -> dict[str, Any]:
    if args.control == "real":
        control = RealControl(args.step_ms / 1000.0, args.instances)
    else:
        control = BatchingControl(args.step_ms / 1000.0, args.linger_ms / 1000.0)
    runner = run_async if args.model == "async" else run_threads
    load_before = os.getloadavg()[0]
    measured = runner(wasm, control, args.instances, args.calls)
    control.stop()
    total_calls = args.instances * args.calls
    batches = [(size, alive) for size, alive in control.batches if alive]
    result = {
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "wall_us_per_call": measured["wall_s"] / total_calls * 1e6,
        "process_cpu_us_per_call": measured["process_cpu_s"] / total_calls * 1e6,
        "num_batches": len(batches), "max_batch": max(s for s, _ in batches),
        "mean_batch": sum(s for s, _ in batches) / len(batches),
        "batch_fullness": sum(s / a for s, a in batches) / len(batches),
    }
    if "scheduler_cpu_s" in measured:
        result["scheduler_cpu_us_per_call"] = measured["scheduler_cpu_s"] / total_calls * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--model", choices=("async", "thread"), default="async")
    parser.add_argument("--api", choices=tuple(GUESTS), default="forward-tokens",
                        help="forward: a forward-request record per call; forward-tokens: flat lists and a "
                             "registered sampler")
    parser.add_argument("--step-ms", type=float, default=0.0, help="fake executor time per step")
    parser.add_argument("--linger-ms", type=float, default=0.0,
                        help="policy experiment: before a step, wait up to this long for every live instance "
                             "to have a forward pending (0: the control's adaptive policy)")
    parser.add_argument("--control", choices=("fake", "real"), default="fake",
                        help="fake: a minimal adaptive batcher (the host alone); real: the engine's Controller "
                             "(validation, page tables, gathering batcher) over a fake executor")
    parser.add_argument("--repeat", type=int, default=1, help="runs (a fresh runtime each); medians reported")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.model == "thread" and args.api != "forward":
        parser.error("the thread-per-instance host implements --api forward only")
    text = GUESTS[args.api].read_text().replace("NUM_STEPS", str(args.calls))
    for key, value in GUEST_SETTINGS.items():
        text = text.replace(key, value)
    wasm = wasmtime.wat2wasm(text)
    runs = [measure(args, wasm) for _ in range(args.repeat)]
    result: dict[str, Any] = {
        "model": args.model, "api": args.api, "instances": args.instances, "calls_per_instance": args.calls,
        "control": args.control, "step_ms": args.step_ms, "linger_ms": args.linger_ms, "cpus": os.cpu_count(), "repeat": args.repeat,
    }
    for key in runs[0]:
        if key != "load_average_1m":
            result[key] = statistics.median(run[key] for run in runs)
    result["runs"] = runs
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

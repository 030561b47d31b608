"""A fake executor for control-layer tests and runtime benchmarks: the Executor interface (info,
num_swap_slots, execute) with no model.

It checks every batch against the protocol of engine/step.py and, with simulate_kv, keeps the
token id written into every KV slot (device pages and host swap slots), applying swaps, copies and writes
in the protocol's order. An output's token is next_token(input token, visible context), where the visible
context is the list of token ids in the slots its row may attend to (causal, or the command's mask); so a
test can tell whether a command saw the right KV after swaps, copies, chunking and remapping. Under an allowed-
token mask, the first allowed token from that one on is sampled.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import msgspec
import numpy as np

from pie_server.engine.config import EngineInfo
from pie_server.engine.step import Batch, CommandResult, ForwardCommand, OutputResult, StepResult

NextToken = Callable[[int, list[int]], int]


class DoneStep:
    def __init__(self, step_id: int, result: StepResult) -> None:
        self.step_id, self._result = step_id, result

    def result(self) -> StepResult:
        return self._result


class FakeExecutor:
    def __init__(self, num_pages: int = 64, page_size: int = 4, num_swap_slots: int = 16,
                 vocab_size: int = 1000, max_context_len: int | None = None,
                 next_token: NextToken | None = None, simulate_kv: bool = True, record: bool = True,
                 check: bool = True, step_delay_s: float = 0.0) -> None:
        self.info = EngineInfo(num_pages=num_pages, page_size=page_size,
                               max_context_len=max_context_len or num_pages * page_size, kv_bytes_per_page=1)
        self.num_swap_slots = num_swap_slots
        self.vocab_size = vocab_size
        self.next_token: NextToken = next_token or (lambda token, context: token + 1)
        self.simulate_kv, self.record, self.check, self.step_delay_s = simulate_kv, record, check, step_delay_s
        self.batches: list[Batch] = []  # every executed batch (when record)
        self.contexts: list[list[int]] = []  # per output, in execution order: its visible context (simulate_kv)
        self.before_execute: Callable[[Batch], None] | None = None  # a test hook, runs inside execute
        self.fail_next: Exception | None = None  # raised (once) by the next execute
        self.num_steps = self.num_commands = self.num_tokens = self.num_fed = 0
        self._previous: StepResult | None = None  # the last submitted step's result (fed tokens)
        self._pages: list[list[int | None]] = [[None] * page_size for _ in range(num_pages)]
        self._host: dict[int, list[int | None]] = {}

    def submit(self, batch: Batch) -> "DoneStep":
        """Pipelined steps: the commands' fed tokens are the outputs of the step submitted before (the
        executor's contract, engine/step.py); the step runs here at once, as on a CPU."""
        forwards = []
        for command in batch.forwards:
            if command.fed_token is not None:
                ref = command.fed_token
                if self._previous is None or ref.command_index >= len(self._previous.results):
                    _require(False, f"fed token {ref} does not name a command of the previous step")
                token = self._previous.results[ref.command_index].outputs[ref.output_index].token_id  # type: ignore[union-attr]
                command = msgspec.structs.replace(command, token_ids=[*command.token_ids[:-1], token],
                                                  fed_token=None)
            forwards.append(command)
        self._previous = None
        result = self.execute(dataclasses.replace(batch, forwards=forwards))
        self._previous = result
        self.num_fed += sum(1 for c in batch.forwards if c.fed_token is not None)
        return DoneStep(batch.step_id, result)

    def execute(self, batch: Batch) -> StepResult:
        if self.before_execute is not None:
            self.before_execute(batch)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        if self.check:
            self._check(batch)
        if self.record:
            self.batches.append(batch)
        if self.simulate_kv:
            self._move_kv(batch)
        results = tuple(self._run(command) for command in batch.forwards)
        self.num_steps += 1
        self.num_commands += len(batch.forwards)
        self.num_tokens += sum(len(c.token_ids) for c in batch.forwards)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return StepResult(results=results, step_id=batch.step_id)

    def page_tokens(self, page_id: int) -> list[int | None]:
        return list(self._pages[page_id])

    # -- checks -------------------------------------------------------------------------------------------
    def _check(self, batch: Batch) -> None:
        page_size, num_pages = self.info.page_size, self.info.num_pages
        for swap in (*batch.swap_outs, *batch.swap_ins):
            _require(0 <= swap.page_id < num_pages, f"swap page {swap.page_id} out of range")
            _require(0 <= swap.swap_slot < self.num_swap_slots, f"swap slot {swap.swap_slot} out of range")
        for copy in batch.page_copies:
            n = page_size - copy.src_offset if copy.num_slots is None else copy.num_slots
            _require(0 <= copy.src_page_id < num_pages and 0 <= copy.dst_page_id < num_pages, "copy page range")
            _require(n > 0 and min(copy.src_offset, copy.dst_offset) >= 0
                     and max(copy.src_offset, copy.dst_offset) + n <= page_size, f"copy out of range: {copy}")
        written: set[tuple[int, int]] = set()
        for b, command in enumerate(batch.forwards):
            for slot in self._check_command(b, command):
                _require(slot not in written, f"command {b} writes slot {slot} that another command writes")
                written.add(slot)

    def _check_command(self, b: int, cmd: ForwardCommand) -> list[tuple[int, int]]:
        page_size, n = self.info.page_size, len(cmd.token_ids)
        _require(n > 0 and len(cmd.positions) == n, f"command {b}: tokens/positions")
        _require(bool(cmd.page_ids) and 1 <= cmd.last_page_len <= page_size, f"command {b}: last_page_len")
        _require(len(set(cmd.page_ids)) == len(cmd.page_ids), f"command {b}: duplicate pages")
        _require(all(0 <= p < self.info.num_pages for p in cmd.page_ids), f"command {b}: page out of range")
        _require(all(0 <= t < self.vocab_size for t in cmd.token_ids), f"command {b}: token out of range")
        context_len = cmd.context_len(page_size)
        _require(n <= context_len <= self.info.max_context_len, f"command {b}: context {context_len}")
        _require(all(0 <= o.index < n for o in cmd.outputs), f"command {b}: output index")
        if cmd.attention_mask is not None:
            _require(len(cmd.attention_mask) == n and all(len(r) == context_len for r in cmd.attention_mask),
                     f"command {b}: mask shape")
            _require(all(any(r) for r in cmd.attention_mask), f"command {b}: an all-false mask row")
        return [self._slot(cmd, s) for s in range(context_len - n, context_len)]

    # -- simulation ---------------------------------------------------------------------------------------
    def _move_kv(self, batch: Batch) -> None:
        for swap in batch.swap_outs:
            self._host[swap.swap_slot] = list(self._pages[swap.page_id])
        for swap in batch.swap_ins:
            _require(swap.swap_slot in self._host, f"swap-in from slot {swap.swap_slot} that was never written")
            self._pages[swap.page_id] = list(self._host[swap.swap_slot])
        for copy in batch.page_copies:
            n = self.info.page_size - copy.src_offset if copy.num_slots is None else copy.num_slots
            src = self._pages[copy.src_page_id][copy.src_offset:copy.src_offset + n]
            self._pages[copy.dst_page_id][copy.dst_offset:copy.dst_offset + n] = src
        for cmd in batch.forwards:
            context_len = cmd.context_len(self.info.page_size)
            for i, token in enumerate(cmd.token_ids):
                page, offset = self._slot(cmd, context_len - len(cmd.token_ids) + i)
                self._pages[page][offset] = token

    def _run(self, cmd: ForwardCommand) -> CommandResult:
        outputs = []
        for spec in cmd.outputs:
            token = cmd.token_ids[spec.index]
            context = self._visible_context(cmd, spec.index) if self.simulate_kv else []
            if self.simulate_kv:
                self.contexts.append(context)
            next_id = self.next_token(token, context) % self.vocab_size
            if spec.sampling is not None and spec.sampling.allowed_token_mask is not None:
                next_id = _first_allowed(spec.sampling.allowed_token_mask, next_id, self.vocab_size)
            if spec.sampling is not None:
                outputs.append(OutputResult(token_id=next_id, logprob=0.0))
            else:
                outputs.append(OutputResult(distribution=((next_id, 1.0),)))
        return CommandResult(outputs=tuple(outputs))

    def _visible_context(self, cmd: ForwardCommand, row: int) -> list[int]:
        context_len = cmd.context_len(self.info.page_size)
        own_slot = context_len - len(cmd.token_ids) + row
        if cmd.attention_mask is None:
            visible = range(own_slot + 1)
        else:
            visible = [j for j, allowed in enumerate(cmd.attention_mask[row]) if allowed]
        context = []
        for j in visible:
            page, offset = self._slot(cmd, j)
            token = self._pages[page][offset]
            _require(token is not None, f"a command reads slot {j} (page {page}) that was never written")
            context.append(token)
        return context

    def _slot(self, cmd: ForwardCommand, j: int) -> tuple[int, int]:
        return cmd.page_ids[j // self.info.page_size], j % self.info.page_size


def _first_allowed(mask: bytes, token_id: int, vocab_size: int) -> int:
    """The first token from token_id on (wrapping around) that mask allows: bit t % 8 of byte t // 8."""
    allowed = np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:vocab_size].astype(bool)
    later = np.flatnonzero(allowed[token_id:])
    if len(later):
        return token_id + int(later[0])
    earlier = np.flatnonzero(allowed[:token_id])
    if len(earlier):
        return int(earlier[0])
    raise ValueError("the mask allows no token")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid batch: {message}")


def measure_control_overhead(num_instances: int = 1000, num_forwards: int = 20, pages_per_seq: int = 4,
                             page_size: int = 16) -> dict[str, float]:
    """The control layer's own cost with this executor (no checks, no KV): every instance submits one decode
    per round, then one step runs them all. Returns microseconds per forward() call and per command of a
    step (batch formation + translation + delivery, the fake's few us included)."""
    from pie_server.engine.control.api import VirtualForward
    from pie_server.engine.control.config import ControlConfig
    from pie_server.engine.control.controller import Controller
    from pie_server.engine.step import OutputSpec, SamplingParams
    from pie_server.engine.types import InstanceId

    executor = FakeExecutor(num_pages=num_instances * pages_per_seq, page_size=page_size, vocab_size=32000,
                            max_context_len=pages_per_seq * page_size, simulate_kv=False, record=False,
                            check=False)
    controller = Controller(executor, ControlConfig(max_batch_size=num_instances, vocab_size=32000,
                                                    max_position=1 << 20))
    instance_ids = [InstanceId(f"i{i}") for i in range(num_instances)]
    pages = {}
    for instance in instance_ids:
        controller.open_instance(instance)
        pages[instance] = controller.allocate_pages(instance, pages_per_seq).result(timeout=0)
    outputs = (OutputSpec(0, SamplingParams()),)
    submit_s = step_s = 0.0
    for k in range(num_forwards):
        last_page_len = k % page_size + 1
        position = (pages_per_seq - 1) * page_size + k
        started = time.perf_counter()
        futures = [controller.forward(i, VirtualForward([k], [position], pages[i], last_page_len, outputs))
                   for i in instance_ids]
        submitted = time.perf_counter()
        controller.step()
        step_s += time.perf_counter() - submitted
        submit_s += submitted - started
        assert all(f.done() for f in futures)
    for instance in instance_ids:
        controller.close_instance(instance)
    num_calls = num_instances * num_forwards
    return {"forward_call_us": submit_s / num_calls * 1e6, "step_us_per_command": step_s / num_calls * 1e6,
            "mean_batch_size": executor.num_commands / executor.num_steps}


if __name__ == "__main__":
    import json
    import sys

    for pages_per_seq in (1, 4, 64):
        result = measure_control_overhead(pages_per_seq=pages_per_seq)
        print(json.dumps({"pages_per_seq": pages_per_seq, **{k: round(v, 2) for k, v in result.items()}}))
        sys.stdout.flush()

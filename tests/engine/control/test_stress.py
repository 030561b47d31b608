"""Many decodes at once over a pool too small for all of them, pipelined, with stops, closes and new arrivals at
random steps: page demands wait, instances are swapped out and back in, steps switch between the direct join of
steady decodes and the planner (scheduling.py). The fake executor's tokens depend on every token of the visible
context (its simulated KV), so a decode that read a wrong page, a stale slot or a lost swap would go astray:
each finished decode must equal its reference, a stopped one a prefix of it, and every page comes back. A third
of the sequences are driven by forward() per token instead (their forwards queued beside the decodes)."""
from __future__ import annotations

import random

import pytest

from tests.engine.control.conftest import Controllers
from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import END_CANCELLED, END_LENGTH, DecodeRequest, DecodeStream
from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

pytestmark = pytest.mark.timeout(120)
PAGE_SIZE, VOCAB = 4, 997


def _next_token(token: int, context: list[int]) -> int:
    """Depends on every token of the context and its order."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + token) % (VOCAB - 3) + 3


def _reference(prompt: list[int], num_tokens: int) -> list[int]:
    sequence, out = list(prompt), []
    for _ in range(num_tokens):
        out.append(_next_token(sequence[-1], sequence))
        sequence.append(out[-1])
    return out


class _Agent:
    def __init__(self, controller: Controller, name: str, rng: random.Random) -> None:
        self.instance = InstanceId(name)
        self.prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 11))]
        self.num_tokens = rng.randrange(1, 24)
        num_pages = -(-(len(self.prompt) + self.num_tokens) // PAGE_SIZE)
        controller.open_instance(self.instance)
        # In two parts: holding the first while waiting for the second, instances can all wait for pages,
        # and preemption swaps some out.
        first = max(1, num_pages // 2)
        self.num_pages_left = num_pages - first
        self.pages = controller.allocate_pages(self.instance, first)
        self.page_ids: list[int] = []
        self.stream: DecodeStream | None = None
        self.stopped = False

    def advance(self, controller: Controller) -> None:
        if self.stream is not None or not self.pages.done():
            return
        self.page_ids += self.pages.result()
        if self.num_pages_left:
            self.pages, self.num_pages_left = controller.allocate_pages(self.instance, self.num_pages_left), 0
            return
        self._start(controller)

    def _start(self, controller: Controller) -> None:
        self.stream = controller.decode(self.instance, DecodeRequest(
            token_ids=self.prompt, position=0, page_ids=self.page_ids, context_len=0,
            sampling=SamplingParams(), max_new_tokens=self.num_tokens))

    def is_running(self) -> bool:
        return self.stream is not None and not self.stream.done.done()

    def is_finished(self) -> bool:
        return self.stream is not None and self.stream.done.done()

    def stop(self, controller: Controller) -> None:
        self.stopped = True
        controller.stop_decode(self.instance, self.stream)  # type: ignore[arg-type]

    def check(self) -> None:
        assert self.stream is not None
        end = self.stream.done.result(timeout=0)
        tokens = [output.token_id for output in self.stream.drain()]
        expected = _reference(self.prompt, self.num_tokens)
        if self.stopped:
            assert end in (END_CANCELLED, END_LENGTH) and tokens == expected[:len(tokens)]
        else:
            assert (end, tokens) == (END_LENGTH, expected)


class _Caller(_Agent):
    """Drives its sequence with a forward() per token, as an inferlet's own loop does: its queued forwards sit
    beside the decodes in the planner."""

    def _start(self, controller: Controller) -> None:
        self.tokens: list[int] = []
        self._forward(controller, self.prompt, 0)
        self.stream = DecodeStream()  # only its done is used: settled when the last token is back

    def _forward(self, controller: Controller, pending: list[int], context: int) -> None:
        num_slots = context + len(pending)
        num_pages = -(-num_slots // PAGE_SIZE)
        self.result = controller.forward(self.instance, VirtualForward(
            pending, list(range(context, num_slots)), self.page_ids[:num_pages],
            num_slots - (num_pages - 1) * PAGE_SIZE, [OutputSpec(len(pending) - 1, SamplingParams())]))

    def advance(self, controller: Controller) -> None:
        if self.stream is None:
            super().advance(controller)
        elif not self.stream.done.done() and self.result.done():
            self.tokens.append(self.result.result().outputs[0].token_id)
            if len(self.tokens) == self.num_tokens:
                self.stream.done.set_result(END_LENGTH)
            else:
                self._forward(controller, self.tokens[-1:], len(self.prompt) + len(self.tokens) - 1)

    def stop(self, controller: Controller) -> None:
        pass  # a caller stops by not calling again; it runs to the end here

    def check(self) -> None:
        assert self.tokens == _reference(self.prompt, self.num_tokens)


def _make(controller: Controller, name: str, rng: random.Random) -> _Agent:
    return (_Caller if rng.random() < 0.3 else _Agent)(controller, name, rng)


def _run(controllers: Controllers, seed: int) -> FakeExecutor:
    rng = random.Random(seed)
    executor = FakeExecutor(num_pages=14, page_size=PAGE_SIZE, num_swap_slots=64, vocab_size=VOCAB,
                            next_token=_next_token)
    controller = controllers.make(executor, ControlConfig(pipeline=rng.random() < 0.8))
    agents = [_make(controller, f"a{k}", rng) for k in range(6)]
    num_made, closed = len(agents), 0
    for _ in range(5000):
        for agent in agents:
            agent.advance(controller)
        if rng.random() < 0.15 and num_made < 40:
            agents.append(_make(controller, f"a{num_made}", rng))
            num_made += 1
        running = [a for a in agents if a.is_running()]
        if running and rng.random() < 0.03:
            rng.choice(running).stop(controller)
        for agent in [a for a in agents if a.is_finished()]:
            agent.check()
            controller.close_instance(agent.instance)
            agents.remove(agent)
            closed += 1
        if not agents:
            break
        controller.step()
    assert not agents and closed == num_made
    return executor


def test_random_decodes_over_a_small_pool_keep_their_kv(controllers: Controllers) -> None:
    """16 random runs (the seed is in the failure's traceback); together they swap and feed tokens on the
    device, or the test would not test what it says."""
    num_swapped = num_fed = 0
    for seed in range(16):
        executor = _run(controllers, seed)
        num_swapped += sum(len(batch.swap_outs) for batch in executor.batches)
        num_fed += executor.num_fed
    assert num_swapped > 20 and num_fed > 1000

"""Step formation (engine/control/scheduling.py), pipelined: the speculated next forwards of steady decodes join
the step directly, without a round through the instances' queues and the planner, and only when the planner
would have taken every one of them; otherwise they are queued and planned as any forward. Either way each decode
gets exactly the tokens of the serial reference."""
from __future__ import annotations

import pytest

from tests.engine.control.conftest import Controllers
from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import END_LENGTH, DecodeRequest, DecodeStream
from pie_server.engine.control.state import ControlState
from pie_server.engine.step import SamplingParams
from pie_server.engine.types import InstanceId

pytestmark = pytest.mark.timeout(60)
PAGE_SIZE = 4
GREEDY = SamplingParams()
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18], [19, 20]]
NUM_TOKENS = 9


class _CountingState:
    """Counts the forwards queued through ControlState.enqueue while the patch is in place."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.num_enqueued = 0
        original = ControlState.enqueue

        def enqueue(state: ControlState, instance, item) -> None:  # noqa: ANN001
            self.num_enqueued += 1
            original(state, instance, item)

        monkeypatch.setattr(ControlState, "enqueue", enqueue)


def _decode_all(controller: Controller, requests: list[tuple[InstanceId, DecodeRequest]]) -> list[list[int]]:
    streams = [controller.decode(instance, request) for instance, request in requests]
    _step_until_done(controller, streams)
    ends = [stream.done.result(timeout=0) for stream in streams]
    assert ends == [END_LENGTH] * len(streams)
    return [[output.token_id for output in stream.drain()] for stream in streams]


def _step_until_done(controller: Controller, streams: list[DecodeStream], max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if all(stream.done.done() for stream in streams):
            return
        controller.step()
    raise AssertionError("the decodes did not end")


def _requests(controller: Controller, prompts: list[list[int]],
              num_decodes_per_instance: int = 1) -> list[tuple[InstanceId, DecodeRequest]]:
    requests = []
    for k, prompt in enumerate(prompts):
        instance = InstanceId(f"i{k // num_decodes_per_instance}")
        if k % num_decodes_per_instance == 0:
            controller.open_instance(instance)
        pages = controller.allocate_pages(instance, 4).result(timeout=10)
        requests.append((instance, DecodeRequest(token_ids=prompt, position=0, page_ids=pages, context_len=0,
                                                 sampling=GREEDY, max_new_tokens=NUM_TOKENS)))
    return requests


def _run(controllers: Controllers, pipeline: bool, num_decodes_per_instance: int = 1,
         **config: int) -> tuple[list[list[int]], FakeExecutor, Controller]:
    executor = FakeExecutor(page_size=PAGE_SIZE, num_pages=64)
    controller = controllers.make(executor, ControlConfig(pipeline=pipeline, **config))
    requests = _requests(controller, PROMPTS, num_decodes_per_instance)
    tokens = _decode_all(controller, requests)
    for instance in dict.fromkeys(instance for instance, _ in requests):
        controller.close_instance(instance)
    return tokens, executor, controller


def test_steady_decodes_join_the_step_without_the_queues(controllers: Controllers,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After the prefill, every pipelined step holds all four decodes and nothing was queued for them: the
    speculated forwards went straight into the steps. The tokens are the serial run's."""
    reference, _, _ = _run(controllers, pipeline=False)
    counting = _CountingState(monkeypatch)
    tokens, executor, _ = _run(controllers, pipeline=True)
    assert tokens == reference
    assert counting.num_enqueued == len(PROMPTS)  # the first forwards (prompts) only
    assert executor.num_fed >= len(PROMPTS) * (NUM_TOKENS - 2)
    steady = [batch for batch in executor.batches[1:] if len(batch.forwards) == len(PROMPTS)]
    assert len(steady) >= NUM_TOKENS - 2


def test_decodes_that_the_planner_might_not_all_take_are_queued(controllers: Controllers,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With seats for three of the four decodes the step may not take them all: they are queued and planned
    round robin (no decode starves), with the serial run's tokens."""
    reference, _, _ = _run(controllers, pipeline=False)
    counting = _CountingState(monkeypatch)
    tokens, executor, _ = _run(controllers, pipeline=True, max_batch_size=3)
    assert tokens == reference
    assert counting.num_enqueued > len(PROMPTS) * (NUM_TOKENS - 2)
    assert max(len(batch.forwards) for batch in executor.batches) == 3


def test_two_decodes_of_one_instance_go_through_the_planner(controllers: Controllers,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two decodes of one instance (the planner checks that their pages do not conflict): queued, and both in
    each step, with the serial run's tokens."""
    reference, _, _ = _run(controllers, pipeline=False, num_decodes_per_instance=2)
    counting = _CountingState(monkeypatch)
    tokens, executor, _ = _run(controllers, pipeline=True, num_decodes_per_instance=2)
    assert tokens == reference
    assert counting.num_enqueued >= len(PROMPTS) * (NUM_TOKENS - 2)
    assert sum(len(batch.forwards) == len(PROMPTS) for batch in executor.batches) >= NUM_TOKENS - 2

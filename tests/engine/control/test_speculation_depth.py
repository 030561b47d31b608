"""ControlConfig.speculation_depth 2: a decode's forwards queued two steps ahead of its delivered tokens, so step
N + 2 is submitted before step N is delivered (engine/control/step_loop.py). The tokens and ends are those of
serial steps (tests/engine/control/test_decoding.py runs every decode case at depth 2 too); these tests check
what the depth itself changes: how many steps are in flight, what a stop wastes, a failed step, and that
callers of forward() keep two steps per token beside decodes that run ahead."""
from __future__ import annotations

import pytest

from tests.engine.control.conftest import Controllers
from tests.engine.control.fake_executor import DoneStep, FakeExecutor
from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import END_LENGTH, END_STOP, DecodeRequest, DecodeStream
from pie_server.engine.step import Batch, OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

pytestmark = pytest.mark.timeout(60)
PAGE_SIZE = 4
PROMPT = [5, 6, 7, 8, 9, 10]
GREEDY = SamplingParams()


class InFlight(FakeExecutor):
    """Counts the steps submitted and not yet delivered, at each submission."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__(page_size=PAGE_SIZE, **kwargs)  # type: ignore[arg-type]
        self.undelivered = 0
        self.in_flight: list[int] = []  # per submission, with it

    def submit(self, batch: Batch) -> DoneStep:
        step = super().submit(batch)
        self.undelivered += 1
        self.in_flight.append(self.undelivered)
        result, executor = step.result, self

        def delivered():  # type: ignore[no-untyped-def]
            executor.undelivered -= 1
            return result()
        step.result = delivered  # type: ignore[method-assign]
        return step


def _make(controllers: Controllers, depth: int, **kwargs: float) -> tuple[Controller, InFlight]:
    kwargs.setdefault("num_pages", 32)
    executor = InFlight(**kwargs)
    return controllers.make(executor, ControlConfig(pipeline=True, speculation_depth=depth)), executor


def _decode(controller: Controller, name: str, max_new_tokens: int, stop: frozenset[int] = frozenset(),
            num_pages: int = 8) -> tuple[InstanceId, DecodeStream]:
    instance = InstanceId(name)
    controller.open_instance(instance)
    pages = controller.allocate_pages(instance, num_pages).result(timeout=10)
    return instance, controller.decode(instance, DecodeRequest(
        token_ids=PROMPT, position=0, page_ids=pages, context_len=0, sampling=GREEDY,
        max_new_tokens=max_new_tokens, stop_token_ids=stop))


def _step_until_done(controller: Controller, stream: DecodeStream) -> None:
    for _ in range(100):
        if stream.done.done():
            return
        controller.step()
    raise AssertionError("the decode did not end")


def _run(controller: Controller, stream: DecodeStream) -> tuple[list[int], str]:
    _step_until_done(controller, stream)
    return [output.token_id for output in stream.drain()], stream.done.result(timeout=10)


@pytest.mark.parametrize("depth", [1, 2])
def test_steps_in_flight_follow_the_depth(controllers: Controllers, depth: int) -> None:
    controller, executor = _make(controllers, depth)
    instance, stream = _decode(controller, "a", 12)
    assert _run(controller, stream) == ([11 + i for i in range(12)], END_LENGTH)
    assert max(executor.in_flight) == depth + 1  # step N + depth submitted before step N is delivered
    assert executor.num_commands == 12  # one forward per token: nothing speculated past max_new_tokens
    assert executor.num_fed == 11
    controller.close_instance(instance)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_stop_token_wastes_at_most_depth_forwards(controllers: Controllers, depth: int) -> None:
    controller, executor = _make(controllers, depth)
    instance, stream = _decode(controller, "a", 50, stop=frozenset({15}))
    assert _run(controller, stream) == ([11, 12, 13, 14, 15], END_STOP)
    assert 5 < executor.num_commands <= 5 + depth  # the speculated forwards past the stop ran and were dropped
    for _ in range(3):
        controller.step()
    assert executor.num_commands <= 5 + depth  # and nothing was queued after the end
    controller.close_instance(instance)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_failed_step_fails_the_steps_fed_from_it_and_the_loop_goes_on(controllers: Controllers, depth: int) -> None:
    controller, executor = _make(controllers, depth)
    instance, stream = _decode(controller, "a", 30)
    for _ in range(4):
        controller.step()
    executor.fail_next = RuntimeError("device lost")
    _step_until_done(controller, stream)
    with pytest.raises(Exception, match="device lost"):
        stream.done.result(timeout=10)
    assert executor.undelivered == 0
    other, again = _decode(controller, "b", 6)  # the engine goes on
    assert _run(controller, again) == ([11, 12, 13, 14, 15, 16], END_LENGTH)
    controller.close_instance(instance)
    controller.close_instance(other)


def test_callers_of_forward_keep_two_steps_per_token_beside_decodes_two_ahead(controllers: Controllers) -> None:
    """A forward() caller's next forward waits for its step's delivery: while one runs, the loop stays one step
    ahead (the caller's forwards in every other step), where two steps ahead would put them in every third."""
    controller, executor = _make(controllers, 2, num_pages=128, step_delay_s=0.002)
    controller.start()
    decoding, stream = _decode(controller, "decode", 400, num_pages=110)
    caller = InstanceId("caller")
    controller.open_instance(caller)
    pages = controller.allocate_pages(caller, 8).result(timeout=10)
    marked = SamplingParams(top_k=1)  # greedy too; tells the caller's commands apart in the executor's batches
    token = 1
    for pos in range(12):
        num_pages = pos // PAGE_SIZE + 1
        token = controller.forward(caller, VirtualForward(
            [token], [pos], pages[:num_pages], pos - (num_pages - 1) * PAGE_SIZE + 1,
            [OutputSpec(0, marked)])).result(timeout=10).outputs[0].token_id
    assert not stream.done.done()  # the decode ran beside the caller all along
    controller.stop_decode(decoding, stream)
    stream.done.result(timeout=10)
    steps = [i for i, batch in enumerate(executor.batches)
             if any(c.outputs and c.outputs[0].sampling == marked for c in batch.forwards)]
    assert len(steps) == 12
    assert (steps[-1] - steps[0]) / 11 <= 2.5  # two steps per token (every third: 3.0)
    controller.close_instance(caller)
    controller.close_instance(decoding)

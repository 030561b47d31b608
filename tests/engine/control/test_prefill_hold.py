"""The prefill hold (ControlConfig.prefill_hold_s): steps with decodes leave new prompts queued until the hold
that the first of them started ends, then take them together; steps without decodes and chunks of a started
prompt are never held."""
from __future__ import annotations

import pytest

from pie_server.engine.config import EngineConfig
from pie_server.engine.control import scheduling
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.types import InstanceId
from tests.engine.control.conftest import Controllers
from tests.engine.control.fake_executor import FakeExecutor
from tests.engine.control.test_batcher import fwd, open_with_pages, sizes

HOLD_S = 0.010
pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(scheduling.time, "monotonic", clock)
    return clock


def make(controllers: Controllers, **config: int | float) -> tuple[Controller, FakeExecutor]:
    executor = FakeExecutor(num_pages=64, page_size=4, vocab_size=1000)
    return controllers.make(executor, ControlConfig(prefill_hold_s=HOLD_S, **config)), executor


class Decodes:
    """Instances that queue one single-token forward each per round (what a running decode does)."""

    def __init__(self, controller: Controller, names: str) -> None:
        self.controller = controller
        self.opened = [open_with_pages(controller, name, 4) for name in names]
        self.position = 0

    def queue(self) -> None:
        for instance, pages in self.opened:
            self.controller.forward(instance, fwd([7], self.position, pages))
        self.position += 1


def close(controller: Controller, names: str) -> None:
    for name in names:
        controller.close_instance(InstanceId(name))


def test_new_prompts_wait_for_the_hold_then_share_one_step(controllers: Controllers, clock: Clock) -> None:
    controller, executor = make(controllers)
    decodes = Decodes(controller, "xy")
    a, a_pages = open_with_pages(controller, "a", 5)
    b, b_pages = open_with_pages(controller, "b", 5)
    decodes.queue()
    first = controller.forward(a, fwd(list(range(1, 13)), 0, a_pages))
    assert controller.step() and sizes(executor) == [1, 1]  # the decodes only: the prompt waits
    clock.now += HOLD_S * 0.6
    decodes.queue()
    second = controller.forward(b, fwd(list(range(1, 11)), 0, b_pages))
    assert controller.step() and sizes(executor) == [1, 1]
    clock.now += HOLD_S * 0.6  # past the hold that the first prompt started: both go, in one step
    decodes.queue()
    assert controller.step() and sizes(executor) == [1, 1, 12, 10]
    assert first.result(timeout=0).outputs[0].token_id == 13 and second.result(timeout=0).outputs[0].token_id == 11
    decodes.queue()
    c, c_pages = open_with_pages(controller, "c", 5)
    controller.forward(c, fwd(list(range(1, 10)), 0, c_pages))
    assert controller.step() and sizes(executor) == [1, 1]  # a later prompt starts a hold of its own
    close(controller, "xyabc")


def test_a_step_without_decodes_takes_prompts_at_once(controllers: Controllers, clock: Clock) -> None:
    controller, executor = make(controllers)
    a, a_pages = open_with_pages(controller, "a", 5)
    future = controller.forward(a, fwd(list(range(1, 13)), 0, a_pages))
    assert controller.step() and sizes(executor) == [12]
    assert future.result(timeout=0).outputs[0].token_id == 13
    close(controller, "a")


def test_a_started_prompt_goes_on_beside_decodes(controllers: Controllers, clock: Clock) -> None:
    controller, executor = make(controllers, max_batch_tokens=8)
    a, a_pages = open_with_pages(controller, "a", 5)
    future = controller.forward(a, fwd(list(range(1, 21)), 0, a_pages))
    assert controller.step() and sizes(executor) == [8]  # no decodes yet: its first chunk goes at once
    decodes = Decodes(controller, "xy")
    decodes.queue()
    assert controller.step() and sizes(executor) == [1, 1, 6]  # its next chunk is not held
    decodes.queue()
    assert controller.step() and sorted(sizes(executor)) == [1, 1, 6]  # the rest (6 tokens: a decode by size)
    assert future.result(timeout=0).outputs[0].token_id == 21
    close(controller, "axy")


def test_off_by_default_and_bounded() -> None:
    assert ControlConfig().prefill_hold_s == 0
    assert ControlConfig.for_engine(EngineConfig(prefill_hold_ms=8)).prefill_hold_s == pytest.approx(0.008)
    with pytest.raises(ValueError, match="prefill_hold_s"):
        ControlConfig(prefill_hold_s=-0.001)
    with pytest.raises(ValueError, match="prefill_hold_ms"):
        EngineConfig(prefill_hold_ms=5000)

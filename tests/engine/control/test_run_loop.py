"""The run loop: gathering (instances that resubmit a moment after their result (guest/host work between tokens)
still share one step per token instead of splitting the batch into alternating halves) and its lifecycle."""
from __future__ import annotations

import threading
import time

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

pytestmark = pytest.mark.timeout(60)
NUM_INSTANCES, NUM_TOKENS, PAGE_SIZE = 8, 12, 4
STEP_S, THINK_S = 0.01, 0.0005  # executor step, and each instance's work between a result and its next forward


def _decode_loop(controller: Controller, name: str, start: threading.Barrier) -> None:
    instance = InstanceId(name)
    controller.open_instance(instance)
    pages = controller.allocate_pages(instance, -(-(NUM_TOKENS + 1) // PAGE_SIZE)).result(timeout=10)
    start.wait()
    token = 1
    for pos in range(NUM_TOKENS):
        num_pages = pos // PAGE_SIZE + 1
        result = controller.forward(instance, VirtualForward(
            [token], [pos], pages[:num_pages], pos - (num_pages - 1) * PAGE_SIZE + 1,
            [OutputSpec(0, SamplingParams())])).result(timeout=10)
        token = result.outputs[0].token_id
        time.sleep(THINK_S)
    controller.close_instance(instance)


def _steps_per_token(config: ControlConfig) -> float:
    executor = FakeExecutor(num_pages=64, page_size=PAGE_SIZE, step_delay_s=STEP_S)
    controller = Controller(executor, config)
    controller.start()
    start = threading.Barrier(NUM_INSTANCES)
    threads = [threading.Thread(target=_decode_loop, args=(controller, f"i{i}", start))
               for i in range(NUM_INSTANCES)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        controller.stop()
    assert controller.stats().num_free_pages == 64
    num_steps = sum(1 for b in executor.batches if b.forwards)
    return num_steps / NUM_TOKENS


def _fewest_steps_per_token(config: ControlConfig, attempts: int = 3) -> float:
    """The best of a few runs: eight threads on a loaded 2-core machine may miss a 5 ms gather window once (1.42
    steps per token seen in one CI run); a loop that does not gather splits every time (~2.0, the test below)."""
    best = float("inf")
    for _ in range(attempts):
        best = min(best, _steps_per_token(config))
        if best <= 1.35:
            break
    return best


def test_gathering_keeps_one_step_per_token() -> None:
    assert _fewest_steps_per_token(ControlConfig(gather_max_s=0.005)) <= 1.35


def test_pipelined_steps_gather_callers_too() -> None:
    """Pipelined, a step formed before the running one is delivered would lack that step's callers: with only
    forwards of callers running (nothing to continue on the device), the loop delivers first and gathers.
    Without that, the callers split into two cohorts in alternate steps (2.0 steps per token)."""
    assert _fewest_steps_per_token(ControlConfig(pipeline=True, gather_max_s=0.005)) <= 1.35


def test_without_gathering_the_batch_splits() -> None:
    """The failure the gather fixes, shown with it off (so the test above can fail)."""
    assert _fewest_steps_per_token(ControlConfig(gather_max_s=0.0)) >= 1.5


def test_gather_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        ControlConfig(gather_fraction=1.5)
    with pytest.raises(ValueError):
        ControlConfig(gather_max_s=-1.0)


def test_is_running_follows_the_run_thread() -> None:
    controller = Controller(FakeExecutor(num_pages=8, page_size=PAGE_SIZE))
    assert not controller.is_running
    controller.start()
    assert controller.is_running
    controller.stop()
    assert not controller.is_running

"""Fair share of the KV pool (docs/decisions/kv-fair-share.md): an instance holding pages beyond its share gives
up what a waiting instance within its share lacks (swapped to host memory), and its own demands wait behind
theirs; alone it may hold the whole pool."""
from __future__ import annotations

from typing import Callable

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from tests.engine.control.test_preemption import fwd, run
from tests.engine.control.conftest import Controllers
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.types import InstanceId

pytestmark = pytest.mark.timeout(60)
A, B = InstanceId("a"), InstanceId("b")
Make = Callable[..., tuple[Controller, FakeExecutor]]


@pytest.fixture
def make(controllers: Controllers) -> Make:
    def factory(num_pages: int = 8, num_swap_slots: int = 8) -> tuple[Controller, FakeExecutor]:
        # Each output is the sum of the context it saw: KV lost in a swap shows in the tokens.
        executor = FakeExecutor(num_pages=num_pages, page_size=4, num_swap_slots=num_swap_slots,
                                vocab_size=100_000, next_token=lambda token, context: sum(context))
        return controllers.make(executor, ControlConfig()), executor

    return factory


def _tokens(num_pages: int) -> list[int]:
    """Tokens that fill num_pages pages of 4, the last with one slot."""
    return list(range(1, 4 * num_pages - 2))


def _hoard(controller: Controller, num_pages: int = 8) -> list[int]:
    """A, the oldest instance, takes num_pages (the whole pool: nobody else wants pages), writes KV, idles."""
    controller.open_instance(A)
    pages = controller.allocate_pages(A, num_pages).result(timeout=0)
    run(controller, controller.forward(A, fwd(_tokens(num_pages), 0, pages)))
    return pages


def test_a_newer_instance_gets_what_it_lacks_from_the_instance_beyond_its_share(make: Make) -> None:
    controller, executor = make()
    a_pages = _hoard(controller)
    controller.open_instance(B)
    b_wanted = controller.allocate_pages(B, 2)
    assert not b_wanted.done()  # the pool is full
    assert controller.step()
    assert len(executor.batches[-1].swap_outs) == 2  # only what B lacks, not all of A's excess over 4
    b_pages = b_wanted.result(timeout=0)
    assert controller.stats().num_swapped == 1
    b_result = run(controller, controller.forward(B, fwd([10, 20, 30, 40, 50], 0, b_pages)))
    assert b_result.outputs[0].token_id == 150
    controller.close_instance(B)
    a_next = controller.forward(A, fwd([30], 29, a_pages))  # A's swapped KV comes back intact
    assert run(controller, a_next).outputs[0].token_id == sum(_tokens(8)) + 30
    controller.close_instance(A)


def test_the_hoarders_own_demand_waits_behind_one_within_its_share(make: Make) -> None:
    controller, _ = make()
    a_pages = _hoard(controller, num_pages=6)
    controller.open_instance(B)
    controller.allocate_pages(B, 2).result(timeout=0)  # the pool is full now: A 6, B 2 (share 4 each)
    a_more = controller.allocate_pages(A, 1)  # asked first, by the older instance...
    b_more = controller.allocate_pages(B, 1)  # ...but A holds more than its share: B is served first
    assert controller.step()
    assert len(b_more.result(timeout=0)) == 1 and not a_more.done()
    controller.close_instance(B)
    assert controller.step()  # A's swapped page comes back with its new one
    assert len(a_more.result(timeout=0)) == 1
    a_next = controller.forward(A, fwd([30], 21, a_pages))
    assert run(controller, a_next).outputs[0].token_id == sum(_tokens(6)) + 30
    controller.close_instance(A)


def test_a_demand_beyond_its_own_share_does_not_take_from_the_hoarder(make: Make) -> None:
    controller, _ = make()
    _hoard(controller)
    controller.open_instance(B)
    b_wanted = controller.allocate_pages(B, 5)  # more than its share of 4: it waits for pages to come free
    assert controller.step() is False and not b_wanted.done() and controller.stats().num_swapped == 0
    controller.close_instance(A)
    assert len(b_wanted.result(timeout=0)) == 5
    controller.close_instance(B)


def test_without_swap_space_the_hoarder_keeps_its_pages_and_nobody_fails(make: Make) -> None:
    controller, _ = make(num_swap_slots=0)
    _hoard(controller)
    controller.open_instance(B)
    b_wanted = controller.allocate_pages(B, 1)
    assert controller.step() is False and not b_wanted.done()  # not the last resort: A is not failed
    controller.close_instance(A)
    assert len(b_wanted.result(timeout=0)) == 1
    controller.close_instance(B)

"""Out of pages: waiting in FIFO order, preemption by swapping and resuming on other pages, the last
resort, deadlock; closing instances mid-flight; executor failures; the run loop."""
from __future__ import annotations

import threading
from typing import Callable

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.api import KV_EVICTED, ControlError, InstanceClosed, VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from tests.engine.control.conftest import Controllers
from pie_server.engine.step import Batch, OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

GREEDY = SamplingParams()
pytestmark = pytest.mark.timeout(60)  # the run-loop tests use threads: fail fast rather than hang
A, B, C = InstanceId("a"), InstanceId("b"), InstanceId("c")
Make = Callable[..., tuple[Controller, FakeExecutor]]


@pytest.fixture
def make(controllers: Controllers) -> Make:
    def factory(num_pages: int = 4, num_swap_slots: int = 8, **config: int) -> tuple[Controller, FakeExecutor]:
        # Each output is the sum of the context it saw: wrong KV after a swap shows in the tokens.
        executor = FakeExecutor(num_pages=num_pages, page_size=4, num_swap_slots=num_swap_slots,
                                vocab_size=100_000, next_token=lambda token, context: sum(context))
        return controllers.make(executor, ControlConfig(**config)), executor

    return factory


def fwd(tokens: list[int], start: int, pages: list[int]) -> VirtualForward:
    context_len = start + len(tokens)
    num_pages = -(-context_len // 4)
    return VirtualForward(tokens, list(range(start, context_len)), pages[:num_pages],
                          context_len - (num_pages - 1) * 4, [OutputSpec(len(tokens) - 1, GREEDY)])


def run(controller: Controller, future, max_steps: int = 20):  # type: ignore[no-untyped-def]
    for _ in range(max_steps):
        if future.done():
            return future.result(timeout=0)
        controller.step()
    raise AssertionError("the future did not resolve")


def test_allocations_wait_in_fifo_order_and_complete(make: Make) -> None:
    controller, _ = make()
    for instance in (A, B, C):
        controller.open_instance(instance)
    pages = controller.allocate_pages(A, 4).result(timeout=0)
    controller.forward(A, fwd([1, 2, 3], 0, pages))
    wait_b = controller.allocate_pages(B, 2)
    wait_c = controller.allocate_pages(C, 1)
    assert controller.stats().num_waiting == 2
    assert controller.step()  # A can run, so nobody is preempted: B and C wait
    assert not wait_b.done() and controller.stats().num_swapped == 0
    controller.free_pages(A, pages[3:])
    assert not wait_c.done()  # C does not overtake B at the head of the queue
    controller.free_pages(A, pages[2:3])
    assert len(wait_b.result(timeout=0)) == 2 and not wait_c.done()
    controller.close_instance(A)
    assert wait_c.result(timeout=0) == [0]
    controller.close_instance(B)
    controller.close_instance(C)


def test_preemption_swaps_out_the_newest_and_resumes_on_other_pages(make: Make) -> None:
    controller, executor = make(num_pages=5)
    controller.open_instance(A)
    controller.open_instance(B)
    a_pages = controller.allocate_pages(A, 2).result(timeout=0)
    b_pages = controller.allocate_pages(B, 2).result(timeout=0)
    a_tokens, b_tokens = [1, 2, 3, 4, 5, 6, 7, 8], [10, 20, 30, 40, 50]
    run(controller, controller.forward(A, fwd(a_tokens, 0, a_pages)))
    run(controller, controller.forward(B, fwd(b_tokens, 0, b_pages)))
    b_physical = list(executor.batches[-1].forwards[0].page_ids)
    # A needs 2 more pages, 1 is free, nothing can run: B (the newest) is swapped out.
    more = controller.allocate_pages(A, 2)
    assert controller.step()
    swap_batch = executor.batches[-1]
    assert sorted(s.page_id for s in swap_batch.swap_outs) == sorted(b_physical) and not swap_batch.forwards
    a_pages += more.result(timeout=0)
    stats = controller.stats()
    assert stats.num_swapped == 1 and stats.num_free_pages == 1
    # B's next forward waits for its pages; A keeps running meanwhile.
    b_next = controller.forward(B, fwd([60], 5, b_pages))
    a_next = controller.forward(A, fwd([9], 8, a_pages))
    assert controller.step()
    assert a_next.result(timeout=0).outputs[0].token_id == sum(a_tokens) + 9 and not b_next.done()
    assert controller.stats().num_waiting == 1
    controller.free_pages(A, [a_pages[0], a_pages[3]])  # B comes back, onto pages it did not have before
    assert controller.step()
    resume = executor.batches[-1]
    swapped_in = {s.page_id for s in resume.swap_ins}
    assert len(resume.swap_ins) == 2 and swapped_in != set(b_physical)
    assert set(resume.forwards[0].page_ids) == swapped_in
    assert b_next.result(timeout=0).outputs[0].token_id == sum(b_tokens) + 60
    assert executor.contexts[-1] == b_tokens + [60]
    assert controller.stats().num_swapped == 0
    controller.close_instance(A)
    controller.close_instance(B)


def test_waiting_victim_is_swapped_and_resumes_after_its_allocation(make: Make) -> None:
    controller, executor = make(num_pages=4)
    controller.open_instance(A)
    controller.open_instance(B)
    a_pages = controller.allocate_pages(A, 1).result(timeout=0)
    b_pages = controller.allocate_pages(B, 2).result(timeout=0)
    run(controller, controller.forward(A, fwd([1, 2, 3], 0, a_pages)))
    run(controller, controller.forward(B, fwd([5, 6, 7, 8, 9, 10], 0, b_pages)))
    b_more = controller.allocate_pages(B, 2)  # B asks first (1 page is free: it waits)...
    a_more = controller.allocate_pages(A, 2)  # ...but A, the older instance, is served first
    assert controller.stats().num_waiting == 2
    assert controller.step()  # nothing can run: B is swapped out for A
    assert len(executor.batches[-1].swap_outs) == 2
    a_pages += a_more.result(timeout=0)
    assert not b_more.done()  # B's pages must come back with its new ones: 4 pages, 1 is free
    a_next = controller.forward(A, fwd([4, 5], 3, a_pages))
    assert controller.step()  # A runs; B (newer) cannot preempt it
    assert a_next.result(timeout=0).outputs[0].token_id == 15 and not b_more.done()
    stats = controller.stats()
    assert (stats.num_swapped, stats.num_waiting, stats.num_free_pages) == (1, 1, 1)
    controller.close_instance(A)
    assert controller.step()  # B comes back and gets its page in the same batch
    assert len(executor.batches[-1].swap_ins) == 2
    b_pages += b_more.result(timeout=0)
    b_next = controller.forward(B, fwd([11, 12, 13], 6, b_pages[:2] + b_pages[3:]))
    assert run(controller, b_next).outputs[0].token_id == sum(range(5, 14))
    assert executor.contexts[-1] == list(range(5, 14))
    controller.close_instance(B)


def test_last_resort_evicts_the_victim_when_no_swap_space(make: Make) -> None:
    """A deadlock with no swap slot: the newest holder's pages are dropped (its pending work fails with
    KV_EVICTED, and so does a later use of its old page ids), and it lives on with new pages."""
    controller, _ = make(num_swap_slots=0)
    controller.open_instance(A)
    controller.open_instance(B)
    controller.allocate_pages(A, 1).result(timeout=0)
    b_pages = controller.allocate_pages(B, 2).result(timeout=0)
    a_more = controller.allocate_pages(A, 2)
    b_more = controller.allocate_pages(B, 1)
    assert controller.step() is False  # no batch: B's pages were simply dropped
    assert len(a_more.result(timeout=0)) == 2
    with pytest.raises(ControlError, match=f"^{KV_EVICTED}: instance 'b' was preempted"):
        b_more.result(timeout=0)
    with pytest.raises(ControlError, match=f"^{KV_EVICTED}: page {b_pages[0]} was dropped"):
        controller.forward(B, fwd([1, 2], 0, b_pages))
    assert controller.stats().num_free_pages == 1
    b_new = controller.allocate_pages(B, 1).result(timeout=0)  # B computes its KV again in a new page
    b_next = controller.forward(B, fwd([1, 2, 3], 0, b_new))
    assert run(controller, b_next).outputs[0].token_id == 6
    controller.close_instance(B)
    controller.close_instance(A)


def test_without_swap_space_a_holder_that_is_not_waiting_is_waited_for_not_failed(make: Make) -> None:
    """The last resort is for a deadlock only: B holds pages but waits for none (its program is busy elsewhere,
    e.g. on a tool's HTTP answer), so it may still free them; A waits instead of B being failed."""
    controller, _ = make(num_swap_slots=0)
    controller.open_instance(A)
    controller.open_instance(B)
    controller.allocate_pages(A, 1).result(timeout=0)
    b_pages = controller.allocate_pages(B, 2).result(timeout=0)
    a_more = controller.allocate_pages(A, 2)
    assert controller.step() is False and not a_more.done()
    b_next = controller.forward(B, fwd([1, 2, 3], 0, b_pages))  # B lives, its pages intact
    assert run(controller, b_next).outputs[0].token_id == 6 and not a_more.done()
    controller.free_pages(B, b_pages)
    controller.step()
    assert len(a_more.result(timeout=0)) == 2
    controller.close_instance(B)
    controller.close_instance(A)


def test_true_deadlock_evicts_the_head_requests_instance(make: Make) -> None:
    """Everyone holding pages waits for pages and no newer instance can give any (B's are exported): the head's
    own instance A gives way, its KV evicted (it may compute it again), and B goes on."""
    controller, _ = make()
    controller.open_instance(A)
    controller.open_instance(B)
    controller.allocate_pages(A, 2).result(timeout=0)
    b_pages = controller.allocate_pages(B, 2).result(timeout=0)
    controller.export_pages(B, b_pages, "x")  # B's pages cannot be swapped out: the export holds them
    a_more = controller.allocate_pages(A, 1)
    b_more = controller.allocate_pages(B, 1)
    controller.step()
    with pytest.raises(ControlError, match=f"^{KV_EVICTED}"):
        a_more.result(timeout=0)
    assert len(b_more.result(timeout=0)) == 1
    controller.unexport_pages("x")
    controller.close_instance(A)
    controller.close_instance(B)


def test_true_deadlock_fails_the_head_request_when_its_instance_has_nothing_to_give(make: Make) -> None:
    controller, _ = make(num_pages=2)
    controller.open_instance(A)
    controller.open_instance(B)
    a_pages = controller.allocate_pages(A, 1).result(timeout=0)
    b_pages = controller.allocate_pages(B, 1).result(timeout=0)
    controller.export_pages(A, a_pages, "a")  # exported: neither instance owns a page alone
    controller.export_pages(B, b_pages, "b")
    a_more = controller.allocate_pages(A, 1)
    b_more = controller.allocate_pages(B, 1)
    assert controller.step() is False
    with pytest.raises(ControlError, match="cannot allocate 1 pages: out of KV pages"):
        a_more.result(timeout=0)
    assert not b_more.done()  # A waits no more, so it may still free its page: B waits
    controller.unexport_pages("a")
    controller.close_instance(A)
    assert len(b_more.result(timeout=0)) == 1
    controller.unexport_pages("b")
    controller.close_instance(B)


def test_waits_while_an_idle_instance_holds_unswappable_pages(make: Make) -> None:
    controller, _ = make()
    controller.open_instance(A)
    controller.open_instance(B)
    a_pages = controller.allocate_pages(A, 2).result(timeout=0)
    controller.export_pages(A, a_pages, "shared")  # shared with the export: cannot be swapped
    controller.allocate_pages(B, 2).result(timeout=0)
    wanted = controller.allocate_pages(B, 1)
    assert controller.step() is False and not wanted.done()  # A may still free them: wait, do not fail
    controller.close_instance(A)
    assert not wanted.done()  # the export still holds them
    controller.unexport_pages("shared")
    assert len(wanted.result(timeout=0)) == 1
    controller.close_instance(B)


def test_close_mid_flight_discards_results(make: Make) -> None:
    controller, executor = make(num_pages=8)
    controller.open_instance(A)
    controller.open_instance(B)
    a_pages = controller.allocate_pages(A, 2).result(timeout=0)
    b_pages = controller.allocate_pages(B, 1).result(timeout=0)
    a_future = controller.forward(A, fwd([1, 2, 3, 4, 5], 0, a_pages))
    b_future = controller.forward(B, fwd([7], 0, b_pages))

    def close_a(batch: Batch) -> None:
        executor.before_execute = None
        assert len(batch.forwards) == 2
        controller.close_instance(A)  # from another thread's point of view: the lock is not held here

    executor.before_execute = close_a
    assert controller.step()
    with pytest.raises(InstanceClosed):
        a_future.result(timeout=0)
    assert b_future.result(timeout=0).outputs[0].token_id == 7
    assert controller.stats().num_free_pages == 7
    controller.close_instance(B)


def test_close_cancels_queued_work_and_waiting_allocations(make: Make) -> None:
    controller, _ = make(max_batch_tokens=4)
    controller.open_instance(A)
    controller.open_instance(B)
    controller.allocate_pages(B, 1).result(timeout=0)
    pages = controller.allocate_pages(A, 3).result(timeout=0)
    prefill = controller.forward(A, fwd(list(range(10)), 0, pages))
    assert controller.step() and not prefill.done()  # in the middle of a chunked prefill
    queued = controller.forward(A, fwd([10], 10, pages))
    waiting = controller.allocate_pages(A, 1)
    other = controller.allocate_pages(B, 1)  # behind A's request
    assert not waiting.done() and not other.done()
    controller.close_instance(A)
    for future in (prefill, queued, waiting):
        with pytest.raises(InstanceClosed):
            future.result(timeout=0)
    assert other.done() and not controller.step()
    with pytest.raises(ControlError, match="unknown instance"):
        controller.forward(A, fwd([1], 0, pages))
    controller.close_instance(B)


def test_executor_failure_fails_only_that_step(make: Make) -> None:
    controller, executor = make()
    controller.open_instance(A)
    pages = controller.allocate_pages(A, 2).result(timeout=0)
    executor.fail_next = RuntimeError("device lost")
    failed = controller.forward(A, fwd([1, 2], 0, pages))
    assert controller.step()
    with pytest.raises(ControlError, match="device lost"):
        failed.result(timeout=0)
    assert run(controller, controller.forward(A, fwd([1, 2, 3], 0, pages))).outputs[0].token_id == 6
    controller.close_instance(A)


def test_run_loop_waits_preempts_and_resumes(make: Make) -> None:
    controller, executor = make(num_pages=4)
    controller.start()
    with pytest.raises(RuntimeError, match="already running"):
        controller.start()
    controller.open_instance(A)
    controller.open_instance(B)
    a_pages = controller.allocate_pages(A, 2).result(timeout=5)
    b_pages = controller.allocate_pages(B, 2).result(timeout=5)
    assert controller.forward(A, fwd([1, 2, 3, 4, 5], 0, a_pages)).result(timeout=5).outputs[0].token_id == 15
    assert controller.forward(B, fwd([6, 7, 8], 0, b_pages)).result(timeout=5).outputs[0].token_id == 21
    a_pages += controller.allocate_pages(A, 2).result(timeout=5)  # the loop preempts B on its own
    b_future = controller.forward(B, fwd([9], 3, b_pages))
    a_future = controller.forward(A, fwd([6, 7, 8, 9, 10], 5, a_pages))
    assert a_future.result(timeout=5).outputs[0].token_id == 55
    done = threading.Event()
    b_future.add_done_callback(lambda f: done.set())
    controller.close_instance(A)
    assert done.wait(timeout=5) and b_future.result(timeout=0).outputs[0].token_id == 30
    controller.stop()
    assert any(b.swap_outs for b in executor.batches) and any(b.swap_ins for b in executor.batches)
    controller.close_instance(B)


def test_executor_failure_during_a_swap_fails_the_moved_instance(make: Make) -> None:
    controller, executor = make()
    controller.open_instance(A)
    controller.open_instance(B)
    controller.allocate_pages(A, 2).result(timeout=0)
    controller.allocate_pages(B, 2).result(timeout=0)
    more = controller.allocate_pages(A, 1)
    executor.fail_next = RuntimeError("copy engine fault")
    assert controller.step()  # the batch swapping B out fails
    assert len(more.result(timeout=0)) == 1
    with pytest.raises(ControlError, match="lost its KV cache.*copy engine fault"):
        controller.allocate_pages(B, 1)
    controller.close_instance(B)
    controller.close_instance(A)


def test_swapped_pages_can_be_exported_and_imported(make: Make) -> None:
    """Blocks, not pages, are shared: an importer of swapped-out pages brings them back itself."""
    controller, executor = make(num_pages=4)
    for instance in (C, A, B):  # C is the oldest: it may preempt A later
        controller.open_instance(instance)
    a_pages = controller.allocate_pages(A, 2).result(timeout=0)
    b_pages = controller.allocate_pages(B, 2).result(timeout=0)
    b_tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    run(controller, controller.forward(B, fwd(b_tokens, 0, b_pages)))
    more = controller.allocate_pages(A, 1)
    assert controller.step()  # B is swapped out
    a_pages += more.result(timeout=0)
    assert controller.stats().num_swapped == 1
    controller.export_pages(B, b_pages, "x")  # B's pages are in host memory: fine
    controller.close_instance(B)
    [own] = controller.allocate_pages(C, 1).result(timeout=0)
    imported = controller.import_pages(C, "x")
    future = controller.forward(C, fwd([7], 8, imported + [own]))
    assert run(controller, future).outputs[0].token_id == sum(b_tokens) + 7  # A was swapped out for it
    assert executor.contexts[-1] == b_tokens + [7]
    assert controller.stats().num_swapped == 1  # A now
    controller.unexport_pages("x")
    controller.close_instance(C)
    controller.close_instance(A)


def test_cache_only_swapped_pages_give_their_slots_back(make: Make) -> None:
    controller, _ = make(num_pages=4, num_swap_slots=1)
    for instance in (C, A, B):  # C is the oldest: it may preempt A later
        controller.open_instance(instance)
    controller.allocate_pages(A, 1).result(timeout=0)
    b_pages = controller.allocate_pages(B, 1).result(timeout=0)
    run(controller, controller.forward(B, fwd([1, 2, 3, 4], 0, b_pages)))
    more = controller.allocate_pages(A, 3)
    controller.step()  # B is swapped out into the only slot
    assert len(more.result(timeout=0)) == 3
    controller.prefix_publish(B, [1, 2, 3, 4], b_pages)  # the cache now holds the swapped page
    controller.close_instance(B)
    assert controller.num_cached_pages == 1
    wanted = controller.allocate_pages(C, 1)
    controller.step()  # to swap out one of A's pages, the cache gives up its slot
    assert len(wanted.result(timeout=0)) == 1 and controller.num_cached_pages == 0
    controller.close_instance(C)
    controller.close_instance(A)

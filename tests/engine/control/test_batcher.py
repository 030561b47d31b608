"""Batch formation: the token budget, decodes before prefill chunks, chunked prefill, per-instance order,
copies before forwards, and many instances through the run loop."""
from __future__ import annotations

import threading
from typing import Callable

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from tests.engine.control.conftest import Controllers
from pie_server.engine.step import CommandResult, OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

GREEDY = SamplingParams()
pytestmark = pytest.mark.timeout(60)  # the run-loop tests use threads: fail fast rather than hang
Make = Callable[..., tuple[Controller, FakeExecutor]]


@pytest.fixture
def make(controllers: Controllers) -> Make:
    def factory(num_pages: int = 64, page_size: int = 4, **config: int) -> tuple[Controller, FakeExecutor]:
        executor = FakeExecutor(num_pages=num_pages, page_size=page_size, vocab_size=1000)
        return controllers.make(executor, ControlConfig(**config)), executor

    return factory


def open_with_pages(controller: Controller, name: str, num_pages: int) -> tuple[InstanceId, list[int]]:
    instance = InstanceId(name)
    controller.open_instance(instance)
    return instance, controller.allocate_pages(instance, num_pages).result(timeout=0)


def fwd(tokens: list[int], start: int, pages: list[int], page_size: int = 4,
        outputs: list[int] | None = None) -> VirtualForward:
    """tokens at positions/slots start.. of the sequence held by pages (as many as the context needs)."""
    context_len = start + len(tokens)
    num_pages = -(-context_len // page_size)
    out = [len(tokens) - 1] if outputs is None else outputs
    return VirtualForward(tokens, list(range(start, context_len)), pages[:num_pages],
                          context_len - (num_pages - 1) * page_size, [OutputSpec(i, GREEDY) for i in out])


def sizes(executor: FakeExecutor, step: int = -1) -> list[int]:
    return [len(c.token_ids) for c in executor.batches[step].forwards]


def drain(controller: Controller, max_steps: int = 100) -> int:
    steps = 0
    while controller.step():
        steps += 1
        assert steps < max_steps
    return steps


def test_token_budget_splits_prefills_into_chunks(make: Make) -> None:
    controller, executor = make(max_batch_tokens=10)
    futures = []
    for name in "abc":
        instance, pages = open_with_pages(controller, name, 2)
        futures.append(controller.forward(instance, fwd(list(range(1, 9)), 0, pages)))
    assert drain(controller) == 3
    assert [sizes(executor, i) for i in range(3)] == [[8, 2], [6, 4], [4]]
    assert all(f.result(timeout=0).outputs[0].token_id == 9 for f in futures)
    assert executor.contexts == [list(range(1, 9))] * 3
    for name in "abc":
        controller.close_instance(InstanceId(name))


def test_decodes_go_first_then_prefill_chunks(make: Make) -> None:
    controller, executor = make(max_batch_tokens=8)
    p, p_pages = open_with_pages(controller, "prefill", 5)
    prefill = controller.forward(p, fwd(list(range(20)), 0, p_pages))
    decodes = {}
    for name in ("d1", "d2"):
        d, d_pages = open_with_pages(controller, name, 1)
        decodes[name] = controller.forward(d, fwd([7], 0, d_pages))
    assert controller.step()
    first = executor.batches[-1].forwards
    assert [len(c.token_ids) for c in first] == [1, 1, 6]  # the decodes, then 6 of the 20 prompt tokens
    assert list(first[2].token_ids) == list(range(6)) and first[2].outputs == ()
    assert all(f.done() for f in decodes.values()) and not prefill.done()
    drain(controller)
    assert sizes(executor, 1) == [8] and sizes(executor, 2) == [6]
    assert prefill.result(timeout=0).outputs[0].token_id == 20
    for name in ("prefill", "d1", "d2"):
        controller.close_instance(InstanceId(name))


def test_chunked_prefill_resolves_once_with_all_outputs(make: Make) -> None:
    controller, executor = make(max_batch_tokens=8)
    instance, pages = open_with_pages(controller, "a", 5)
    tokens = list(range(100, 120))
    done_calls: list[CommandResult] = []
    future = controller.forward(instance, fwd(tokens, 0, pages, outputs=[3, 10, 19, 3]))
    future.add_done_callback(lambda f: done_calls.append(f.result(timeout=0)))
    assert controller.step() and not future.done()
    assert controller.step() and not future.done()
    assert controller.step() and future.done()
    chunks = executor.batches
    assert [(c.forwards[0].positions[0], len(c.forwards[0].token_ids)) for c in chunks] == [(0, 8), (8, 8), (16, 4)]
    # Each chunk carries the outputs whose token it holds, re-indexed; the last page shrinks with the chunk.
    assert [[o.index for o in c.forwards[0].outputs] for c in chunks] == [[3, 3], [2], [3]]
    assert [(len(c.forwards[0].page_ids), c.forwards[0].last_page_len) for c in chunks] == [(2, 4), (4, 4), (5, 4)]
    assert len(done_calls) == 1
    assert [o.token_id for o in done_calls[0].outputs] == [104, 111, 120, 104]
    assert executor.contexts[-1] == tokens  # the last chunk saw every earlier chunk's KV
    controller.close_instance(instance)


def test_forwards_of_one_instance_run_in_order(make: Make) -> None:
    controller, executor = make(max_batch_tokens=6)
    instance, pages = open_with_pages(controller, "a", 3)
    first = controller.forward(instance, fwd(list(range(10)), 0, pages))
    second = controller.forward(instance, fwd([10], 10, pages))  # depends on the first's KV
    drain(controller)
    assert [sizes(executor, i) for i in range(3)] == [[6], [4], [1]]
    assert first.result(timeout=0).outputs[0].token_id == 10 and second.result(timeout=0).outputs[0].token_id == 11
    assert executor.contexts[-1] == list(range(11))
    controller.close_instance(instance)


def test_independent_forwards_of_one_instance_share_a_step(make: Make) -> None:
    controller, executor = make()
    instance, pages = open_with_pages(controller, "a", 9)
    prompt_future = controller.forward(instance, fwd([1, 2, 3, 4], 0, pages))  # the prompt fills page 0
    drain(controller)
    assert prompt_future.result(timeout=0).outputs[0].token_id == 5
    # Eight beams: each reads the prompt page (beam 0 through a forked id) and writes a page of its own.
    [fork] = controller.share_pages(instance, pages[:1])
    prompt_ids = [fork] + [pages[0]] * 7
    beams = [controller.forward(instance, fwd([10 + i], 4, [prompt_ids[i], pages[1 + i]])) for i in range(8)]
    dependent = controller.forward(instance, fwd([7], 5, [fork, pages[1]]))  # writes beam 0's page
    assert controller.step()
    assert sizes(executor) == [1] * 8
    assert controller.step()
    assert sizes(executor) == [1]
    assert [b.result(timeout=0).outputs[0].token_id for b in beams] == [11 + i for i in range(8)]
    assert dependent.result(timeout=0).outputs[0].token_id == 8
    assert executor.contexts[-9:] == [[1, 2, 3, 4, 10 + i] for i in range(8)] + [[1, 2, 3, 4, 10, 7]]
    controller.close_instance(instance)


def test_copies_run_before_the_instances_next_forward(make: Make) -> None:
    controller, executor = make()
    instance, pages = open_with_pages(controller, "a", 3)
    controller.forward(instance, fwd([1, 2, 3, 4, 5, 6], 0, pages))
    controller.copy_slots(instance, pages[1], pages[2], 0, 0, 2)  # after the forward: slots 4, 5
    after = controller.forward(instance, fwd([9], 2, [pages[2]] + pages[:1], outputs=[0]))
    assert controller.step()
    assert executor.batches[-1].page_copies == [] and sizes(executor) == [6]
    assert controller.step()
    [copy] = executor.batches[-1].page_copies
    assert (copy.src_page_id, copy.dst_page_id, copy.num_slots) == (pages[1], pages[2], 2)
    assert sizes(executor) == [1]
    assert executor.contexts[-1] == [5, 6, 9]  # saw the copied slots
    assert after.result(timeout=0).outputs[0].token_id == 10
    controller.close_instance(instance)


def test_batch_size_limit(make: Make) -> None:
    controller, executor = make(max_batch_size=2)
    futures = []
    for i in range(5):
        instance, pages = open_with_pages(controller, f"i{i}", 1)
        futures.append(controller.forward(instance, fwd([i], 0, pages)))
    assert drain(controller) == 3
    assert [sizes(executor, i) for i in range(3)] == [[1, 1], [1, 1], [1]]
    assert [f.result(timeout=0).outputs[0].token_id for f in futures] == [1, 2, 3, 4, 5]
    for i in range(5):
        controller.close_instance(InstanceId(f"i{i}"))


def test_look_ahead_mask_is_never_chunked(make: Make) -> None:
    controller, executor = make(max_batch_tokens=4)
    instance, pages = open_with_pages(controller, "a", 2)
    other, other_pages = open_with_pages(controller, "b", 1)
    mask = [[True] * 6 for _ in range(6)]  # bidirectional: every token sees all six
    controller.forward(other, fwd([1], 0, other_pages))
    future = controller.forward(instance, VirtualForward(list(range(6)), list(range(6)), pages, 2,
                                                         [OutputSpec(0, GREEDY)], mask))
    drain(controller)
    assert sizes(executor, 0) == [1, 6]  # alone over the budget, in one piece
    assert executor.contexts[-1] == list(range(6)) and future.result(timeout=0).outputs[0].token_id == 1
    controller.close_instance(instance)
    controller.close_instance(other)


def test_thousand_instances_through_the_run_loop(make: Make) -> None:
    controller, executor = make(num_pages=1024, max_batch_size=512)
    num_instances, num_forwards = 1000, 4
    all_done = threading.Event()
    remaining = [num_instances]
    lock = threading.Lock()
    results: dict[str, list[int]] = {}

    def submit(name: str, pages: list[int], step: int, token: int) -> None:
        future = controller.forward(InstanceId(name), fwd([token], step, pages))
        future.add_done_callback(lambda f: on_done(name, pages, step, f.result(timeout=0).outputs[0].token_id))

    def on_done(name: str, pages: list[int], step: int, token: int) -> None:
        results[name].append(token)
        if step + 1 < num_forwards:
            submit(name, pages, step + 1, token)
            return
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    for i in range(num_instances):
        name = f"i{i}"
        instance, pages = open_with_pages(controller, name, 1)
        results[name] = []
        submit(name, pages, 0, i % 500)
    # Started after the first round is queued, so the first step is full whatever the machine's load (a run loop
    # started first took the forwards as they trickled in: max batch 451 once on a busy 2-core machine).
    controller.start()
    assert all_done.wait(timeout=30)
    controller.stop()
    assert all(results[f"i{i}"] == [i % 500 + k for k in range(1, num_forwards + 1)] for i in range(num_instances))
    assert executor.num_commands == num_instances * num_forwards
    assert max(len(b.forwards) for b in executor.batches) == 512  # the batches fill up
    for i in range(num_instances):
        controller.close_instance(InstanceId(f"i{i}"))

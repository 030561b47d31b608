"""Controller.decode: a sequence decoded in the control layer, one queued forward per step without a round trip to
the caller, equals the same sequence driven by forward() per token; and it ends where it must (stop token,
max_new_tokens, the pages' room, stop_decode, a closed instance), never leaving a forward behind."""
from __future__ import annotations

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from tests.engine.control.conftest import Controllers
from pie_server.engine.control.api import ControlError, VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import (END_CANCELLED, END_LENGTH, END_ROOM, END_STOP, DecodeRequest,
                                                DecodeStream, wait_any)
from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

# Every test runs with steps one after the other, pipelined (step N + 1 submitted before N is delivered, decodes
# fed on the device) and pipelined two steps ahead (ControlConfig.speculation_depth 2: N + 2 submitted too): the
# same tokens and ends every way. `pipeline` is the depth (0: serial).
pytestmark = [pytest.mark.timeout(60),
              pytest.mark.parametrize("pipeline", [0, 1, 2], ids=["serial", "pipelined", "depth2"])]
PAGE_SIZE = 4
GREEDY = SamplingParams()
PROMPT = [5, 6, 7, 8, 9, 10]


def _make(controllers: Controllers, pipeline: int, **kwargs: float) -> tuple[Controller, FakeExecutor]:
    kwargs.setdefault("num_pages", 32)
    executor = FakeExecutor(page_size=PAGE_SIZE, **kwargs)  # type: ignore[arg-type]
    config = ControlConfig(pipeline=pipeline > 0, speculation_depth=max(1, pipeline))
    return controllers.make(executor, config), executor


def _by_forwards(controller: Controller, instance: InstanceId, pages: list[int], num_tokens: int) -> list[int]:
    """The reference: forward() per token, the caller feeding each sampled token back."""
    tokens, pending, context = [], list(PROMPT), 0
    for _ in range(num_tokens):
        num_slots = context + len(pending)
        num_pages = -(-num_slots // PAGE_SIZE)
        result = controller.forward(instance, VirtualForward(
            pending, list(range(context, num_slots)), pages[:num_pages], num_slots - (num_pages - 1) * PAGE_SIZE,
            [OutputSpec(len(pending) - 1, GREEDY)])).result(timeout=10)
        context, pending = num_slots, [result.outputs[0].token_id]
        tokens.append(pending[0])
    return tokens


def _drain_all(stream: DecodeStream) -> tuple[list[int], str]:
    end = stream.done.result(timeout=10)
    return [output.token_id for output in stream.drain()], end


def _open(controller: Controller, name: str, num_pages: int) -> tuple[InstanceId, list[int]]:
    instance = InstanceId(name)
    controller.open_instance(instance)
    return instance, controller.allocate_pages(instance, num_pages).result(timeout=10)


def _request(pages: list[int], max_new_tokens: int, stop: frozenset[int] = frozenset()) -> DecodeRequest:
    return DecodeRequest(token_ids=PROMPT, position=0, page_ids=pages, context_len=0, sampling=GREEDY,
                         max_new_tokens=max_new_tokens, stop_token_ids=stop)


def test_a_decode_looks_its_pages_up_once_until_a_block_moves(controllers: Controllers, pipeline: int) -> None:
    """Batch formation translates a decode's blocks to pages once and hands the same list to its next forwards
    over the same pages, until PagePool.placement_version says a block moved (a swap): then it looks again."""
    controller, executor = _make(controllers, pipeline)
    a, pages_a = _open(controller, "a", 5)
    stream = controller.decode(a, DecodeRequest(token_ids=list(range(1, 10)), position=0, page_ids=pages_a,
                                                context_len=0, sampling=GREEDY, max_new_tokens=4))
    while len(executor.batches) < 3:  # the prefill (9 slots of 3 pages), then decodes at 10 and 11 slots
        assert controller.step()
    first, second = (executor.batches[i].forwards[0].page_ids for i in (1, 2))
    # the same tuple: the executor converts and checks a tuple it has seen once (step_inputs.PageArrays)
    assert second is first and isinstance(first, tuple) and list(first) == pages_a[:3]
    controller.state.res.pool.placement_version += 1  # as a swap does
    while len(executor.batches) < 4:  # the decode at 12 slots, still 3 pages
        assert controller.step()
    third = executor.batches[3].forwards[0].page_ids
    assert third is not first and list(third) == list(first)
    for _ in range(8):  # pipelined: the last steps are delivered later
        if stream.done.done():
            break
        controller.step()
    assert stream.done.result(timeout=0) == END_LENGTH
    controller.close_instance(a)


def test_decode_equals_forward_per_token_and_needs_one_call(controllers: Controllers, pipeline: int) -> None:
    controller, executor = _make(controllers, pipeline)
    controller.start()
    a, pages_a = _open(controller, "a", 5)
    b, pages_b = _open(controller, "b", 5)
    expected = _by_forwards(controller, a, pages_a, 12)
    num_commands = executor.num_commands
    tokens, end = _drain_all(controller.decode(b, _request(pages_b, 12)))
    assert tokens == expected and end == END_LENGTH
    assert executor.num_commands - num_commands == 12  # one forward per token, all queued by the controller
    assert (executor.num_fed >= 10) == (pipeline > 0)  # pipelined: each next token was fed on the device
    for instance in (a, b):
        controller.close_instance(instance)


def test_decode_ends_at_a_stop_token_and_at_the_end_of_its_room(controllers: Controllers, pipeline: int) -> None:
    controller, _ = _make(controllers, pipeline)
    controller.start()
    instance, pages = _open(controller, "a", 5)
    reference = _by_forwards(controller, instance, pages, 8)
    tokens, end = _drain_all(controller.decode(instance, _request(pages, 100, frozenset({reference[3]}))))
    assert tokens == reference[:4] and end == END_STOP
    # 3 pages: 12 slots hold the 6 prompt tokens and the first 6 new ones; the 7th is sampled, with no slot.
    tokens, end = _drain_all(controller.decode(instance, _request(pages[:3], 100)))
    assert tokens == reference[:7] and end == END_ROOM
    controller.close_instance(instance)


def test_a_decode_given_more_pages_while_it_runs_goes_on_past_its_old_room(controllers: Controllers,
                                                                           pipeline: int) -> None:
    """extend_decode: pages added mid-decode (a few steps in, so pipelined forwards are running) follow its
    pages; it then equals a decode given them all at the start. An extension that names another count of pages
    than the decode holds (one was lost) changes nothing: the decode ends at its room, as without it."""
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 6)
    reference = controller.decode(instance, _request(pages[:5], 100))  # 20 slots: 6 prompt + 14 new, 15 sampled
    _step_until_done(controller, reference)
    reference_tokens, reference_end = [o.token_id for o in reference.drain()], reference.done.result(timeout=0)
    assert reference_end == END_ROOM and len(reference_tokens) == 15

    extended = controller.decode(instance, _request(pages[:3], 100))
    for _ in range(3):
        controller.step()
    controller.extend_decode(instance, extended, pages[3:5], 3)
    controller.extend_decode(instance, extended, [pages[5]], 3)  # a stale count: ignored
    _step_until_done(controller, extended)
    assert [o.token_id for o in extended.drain()] == reference_tokens and extended.done.result(timeout=0) == END_ROOM
    controller.close_instance(instance)


def test_extend_decode_takes_only_the_instances_pages_each_once(controllers: Controllers, pipeline: int) -> None:
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 4)
    stream = controller.decode(instance, _request(pages[:2], 100))
    with pytest.raises(ControlError, match="already in the decode's pages"):
        controller.extend_decode(instance, stream, [pages[2], pages[1]], 2)
    with pytest.raises(ControlError, match="not instance"):
        controller.extend_decode(instance, stream, [pages[2], 99], 2)
    with pytest.raises(ControlError, match="of a decode this control layer runs"):
        controller.extend_decode(instance, DecodeStream(), [pages[2]], 2)
    _step_until_done(controller, stream)
    assert stream.done.result(timeout=0) == END_ROOM and len(stream.drain()) == 3  # 8 slots: nothing was added
    controller.close_instance(instance)


def test_stop_decode_ends_it_and_queues_nothing_more(controllers: Controllers, pipeline: int) -> None:
    controller, executor = _make(controllers, pipeline, step_delay_s=0.01)
    controller.start()
    instance, pages = _open(controller, "a", 8)
    stream = controller.decode(instance, _request(pages, 100))
    while not stream.drain():
        waiter = wait_any([stream])
        if waiter is not None:
            waiter.result(timeout=10)
    controller.stop_decode(instance, stream)
    assert stream.done.result(timeout=10) == END_CANCELLED
    num_commands = executor.num_commands
    controller.step()  # nothing left to run for it
    assert executor.num_commands == num_commands
    controller.close_instance(instance)


def test_closing_the_instance_fails_its_decode(controllers: Controllers, pipeline: int) -> None:
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    stream = controller.decode(instance, _request(pages, 100))
    controller.step()
    controller.close_instance(instance)
    with pytest.raises(Exception, match="closed"):
        stream.done.result(timeout=10)
    assert wait_any([stream]) is None  # ended: nothing to wait for


def test_decode_validates_like_forward(controllers: Controllers, pipeline: int) -> None:
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 1)
    with pytest.raises(Exception, match="pages hold 4 slots"):
        controller.decode(instance, _request(pages, 4))  # 6 prompt tokens, one page
    controller.close_instance(instance)


def test_concurrent_decodes_with_different_ends(controllers: Controllers, pipeline: int) -> None:
    """Decodes that end at different steps (length, stop token, room) next to per-token forwards: each gets
    exactly its reference tokens; pipelined, a decode that stops on a token wastes at most one forward."""
    controller, executor = _make(controllers, pipeline, num_pages=64)
    controller.start()
    ref, ref_pages = _open(controller, "ref", 8)
    reference = _by_forwards(controller, ref, ref_pages, 20)
    opened = [_open(controller, name, 8) for name in ("a", "b", "c", "d")]
    streams = [controller.decode(opened[0][0], _request(opened[0][1], 20)),
               controller.decode(opened[1][0], _request(opened[1][1], 50, frozenset({reference[4]}))),
               controller.decode(opened[2][0], _request(opened[2][1][:4], 50))]
    extra = _by_forwards(controller, opened[3][0], opened[3][1], 9)
    results = [_drain_all(stream) for stream in streams]
    assert results == [(reference, END_LENGTH), (reference[:5], END_STOP), (reference[:11], END_ROOM)]
    assert extra == reference[:9]
    for instance, _ in [(ref, None), *opened]:
        controller.close_instance(instance)


def _step_until_done(controller: Controller, stream: DecodeStream, max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if stream.done.done():
            return
        controller.step()
    raise AssertionError("the decode did not end")


def test_a_page_freed_mid_decode_ends_it_with_an_error(controllers: Controllers, pipeline: int) -> None:
    """A decode's later forwards reuse the blocks its earlier ones validated only while no page of the
    instance was freed since (PageTable.version)."""
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    stream = controller.decode(instance, _request(pages, 100))
    for _ in range(3):
        controller.step()
    controller.free_pages(instance, [pages[0]])
    _step_until_done(controller, stream)
    with pytest.raises(Exception, match="page 0 was already freed"):
        stream.done.result(timeout=10)
    assert len(stream.drain()) < 10
    controller.close_instance(instance)


def test_slots_masked_mid_decode_are_hidden_from_its_later_forwards(controllers: Controllers,
                                                                     pipeline: int) -> None:
    controller, executor = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    stream = controller.decode(instance, _request(pages, 12))
    for _ in range(3):
        controller.step()
    num_batches = len(executor.batches)
    controller.mask_slots(instance, pages[0], [False, True, True, True])
    _step_until_done(controller, stream)
    assert stream.done.result(timeout=10) == END_LENGTH
    later = [command for batch in executor.batches[num_batches + 1:] for command in batch.forwards]
    assert later and all(command.attention_mask is not None and not command.attention_mask[-1][0]
                         and all(command.attention_mask[-1][1:]) for command in later)
    controller.close_instance(instance)


def test_a_decode_with_penalties_gives_each_forward_its_output_so_far(controllers: Controllers,
                                                                      pipeline: int) -> None:
    controller, executor = _make(controllers, pipeline)
    controller.start()
    instance, pages = _open(controller, "a", 5)
    penalized = SamplingParams(presence_penalty=0.5, output_token_ids=(3, 4))  # 3, 4: an earlier round's output
    tokens, end = _drain_all(controller.decode(instance, DecodeRequest(
        token_ids=PROMPT, position=0, page_ids=pages, context_len=0, sampling=penalized, max_new_tokens=5)))
    assert tokens == [11, 12, 13, 14, 15] and end == END_LENGTH
    outputs = [c.outputs[0].sampling.output_token_ids for b in executor.batches for c in b.forwards]
    assert outputs == [(3, 4), (3, 4, 11), (3, 4, 11, 12), (3, 4, 11, 12, 13), (3, 4, 11, 12, 13, 14)]
    assert executor.num_fed == 0  # never queued ahead of its token: the next forward's parameters need it
    controller.close_instance(instance)

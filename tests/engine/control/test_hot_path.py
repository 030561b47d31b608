"""The shortcuts of the steady decode path (engine/control/work.py, scheduling.py) against the general code they
stand for: the positional constructors' field order, next_item's fast path against full validation, and the
TokenRefs kept by the ControlState."""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import pytest

from pie_server.engine.control.api import ControlError
from pie_server.engine.control.decoding import DecodeRequest, DecodeStream
from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.resources import Resources
from pie_server.engine.control.state import ControlState
from pie_server.engine.control.work import HOT_FIELD_ORDER, ForwardItem, Limits, _decode_item, first_item, next_item
from pie_server.engine.step import ForwardCommand, SamplingParams, TokenRef

PAGE_SIZE = 4


def test_positional_constructors_follow_the_field_order() -> None:
    for cls, names in ((ForwardItem, tuple(field.name for field in dataclasses.fields(ForwardItem))),
                       (ForwardCommand, ForwardCommand.__struct_fields__)):
        order = HOT_FIELD_ORDER[cls.__name__]
        assert names[:len(order)] == order


def test_next_item_fast_path_equals_full_validation() -> None:
    table = PageTable(PAGE_SIZE, None)
    page_ids = table.add([10, 11, 12])
    limits = Limits(page_size=PAGE_SIZE, max_context_len=64, vocab_size=100, max_position=64)
    request = DecodeRequest(token_ids=(1, 2, 3), position=0, page_ids=tuple(page_ids), context_len=0,
                            sampling=SamplingParams(), max_new_tokens=8)
    item = first_item(request, DecodeStream(), table, limits)
    for token_id in (7, 8, 9, 10, 11):  # crosses into the second page and the third
        fast = next_item(item, token_id, table, limits)
        assert item.decoding is not None
        slow = _decode_item(item.decoding, [token_id], item.positions[-1] + 1, item.context_len, table, limits)
        for field in dataclasses.fields(ForwardItem):
            assert getattr(fast, field.name) == getattr(slow, field.name), field.name
        item = fast


@pytest.mark.parametrize("next_page", ["listed twice", "unknown", "masked"])
def test_a_bad_next_page_fails_as_full_validation_does(next_page: str) -> None:
    """The fast path's page crossing (work._grown) refuses what prepare_forward refuses, and the slow path then
    answers: the same error, or (a masked page) the same item with its mask."""
    table = PageTable(PAGE_SIZE, None)
    page_ids = table.add([10, 11, 12])
    if next_page == "masked":
        table.set_visibility(page_ids[1], [True, False, True, True])
    second = {"listed twice": page_ids[0], "unknown": 99, "masked": page_ids[1]}[next_page]
    limits = Limits(page_size=PAGE_SIZE, max_context_len=64, vocab_size=100, max_position=64)
    request = DecodeRequest(token_ids=(1, 2, 3), position=0, page_ids=(page_ids[0], second), context_len=0,
                            sampling=SamplingParams(), max_new_tokens=8)
    item = first_item(request, DecodeStream(), table, limits)
    item = next_item(item, 7, table, limits)  # the fourth slot: still the first page
    assert item.decoding is not None and len(item.page_ids) == 1
    slow_error = fast_error = None
    try:
        slow = _decode_item(item.decoding, [8], item.positions[-1] + 1, item.context_len, table, limits)
    except ControlError as error:
        slow_error = str(error)
    try:
        fast = next_item(item, 8, table, limits)  # the fifth slot opens the next page
    except ControlError as error:
        fast_error = str(error)
    assert fast_error == slow_error
    if next_page == "masked":
        assert fast.mask is not None and fast.mask == slow.mask and fast.block_ids == slow.block_ids
    else:
        assert fast_error is not None


def test_token_refs_are_the_command_indices() -> None:
    state = ControlState(ControlConfig(), Resources(8, PAGE_SIZE, 8),
                         Limits(page_size=PAGE_SIZE, max_context_len=32, vocab_size=None, max_position=None))
    refs = state.token_refs(5)
    assert refs[:5] == [TokenRef(i) for i in range(5)]
    assert state.token_refs(3) is refs  # kept: TokenRef is immutable


def test_fast_forward_command_equals_keywords() -> None:
    item = ForwardItem(token_ids=[4], positions=[6], page_ids=[0, 1], block_ids=[0, 1], context_len=7,
                       page_size=PAGE_SIZE, outputs=(), mask=None, chunkable=True, future=Future())
    item.fed = TokenRef(2)
    command, output_ids = item.command(0, 1, [5, 9])
    assert output_ids is None
    assert command == ForwardCommand(token_ids=[4], positions=[6], page_ids=[5, 9], last_page_len=3, outputs=(),
                                     attention_mask=None, fed_token=TokenRef(2))

"""The hot-path codecs: flat argument decoding (u32 and list<u32>), the pre-built result<list<u32>, string>
encoder, and the kind checks that keep a guest with other import types from making the host read foreign
memory."""
from __future__ import annotations

import ctypes
from typing import Any, Iterator

import pytest

from pie_server.engine.runtime import values
from pie_server.engine.runtime.values_compiled import MAX_CACHED_LIST, read_u32_list
from pie_server.engine.runtime.values_encode import MAX_PREBUILT_LIST, U32_LIST_RESULT
from pie_server.engine.runtime.values_layout import PAIR

FLAT = (("list", "u32"), ("list", "u32"), "u32", ("list", "u32"), "u32")


class Vals:
    """A C array of vals built with the generic encoder (freed by close())."""

    def __init__(self, schemas: tuple[Any, ...], items: list[Any]) -> None:
        self.buffer = ctypes.create_string_buffer(values.VAL_SIZE * len(items))
        self.address = ctypes.addressof(self.buffer)
        for i, (schema, item) in enumerate(zip(schemas, items)):
            values.encode_into(schema, item, self.address + values.VAL_SIZE * i)
        self.count = len(items)

    def close(self) -> None:
        for i in range(self.count):
            values.ffi.wasmtime_component_val_delete(
                ctypes.cast(self.address + values.VAL_SIZE * i, ctypes.POINTER(values.ffi.wasmtime_component_val_t)))


@pytest.fixture
def vals() -> Iterator[list[Vals]]:
    made: list[Vals] = []
    yield made
    for v in made:
        v.close()


def _vals(made: list[Vals], schemas: tuple[Any, ...], items: list[Any]) -> Vals:
    made.append(Vals(schemas, items))
    return made[-1]


@pytest.mark.parametrize("sizes", [(0, 1, 5), (1, 0, 1), (3, MAX_CACHED_LIST + 5, 0)])
def test_flat_decoder_reads_u32_and_lists(vals: list[Vals], sizes: tuple[int, int, int]) -> None:
    first, second, third = ([7 * i + n for i in range(n)] for n in sizes)
    items = [first, second, 2**32 - 1, third, 0]
    args = _vals(vals, FLAT, items)
    decoded = values.compile_args(FLAT)(args.address, args.count)
    assert decoded == [tuple(first), tuple(second), 2**32 - 1, tuple(third), 0]
    assert all(type(d) is tuple for d in (decoded[0], decoded[1], decoded[3]))  # GC-untrackable


def test_flat_decoder_refuses_other_kinds(vals: list[Vals]) -> None:
    decode = values.compile_args(FLAT)
    wrong_top = _vals(vals, (("list", "u32"), "u64", "u32", ("list", "u32"), "u32"), [[1], 5, 2, [3], 4])
    with pytest.raises(TypeError, match="kinds differ"):
        decode(wrong_top.address, wrong_top.count)
    wrong_elements = _vals(vals, (("list", "u64"), ("list", "u32"), "u32", ("list", "u32"), "u32"),
                           [[1, 2], [1], 2, [3], 4])
    with pytest.raises(TypeError, match="holds other values"):
        decode(wrong_elements.address, wrong_elements.count)
    with pytest.raises(TypeError, match="arguments, expected"):
        decode(wrong_elements.address, 4)


def test_read_u32_list_checks_the_element_kind(vals: list[Vals]) -> None:
    wide = _vals(vals, (("list", "u64"),), [[1, 2]])  # a list's elements share one kind: the first tells
    size, ptr = PAIR.unpack_from(ctypes.string_at(wide.address, 32), 8)
    with pytest.raises(TypeError, match="holds other values"):
        read_u32_list(size, ptr)
    assert read_u32_list(0, 0) == ()


def test_compiled_decoders_check_kinds_before_following_pointers(vals: list[Vals]) -> None:
    from pie_server.engine.runtime.api_forward import FORWARD_REQUEST
    # a u64 where a record is expected: its payload would read as (6 fields, garbage pointer)
    fake = _vals(vals, ("u64",), [6])
    for schema in (FORWARD_REQUEST, ("option", "u32"), ("list", ("tuple", "u32", "u32")),
                   ("variant", {"a": "u32"}), "string"):
        with pytest.raises(TypeError, match="kind"):
            values.decode_args_with([values.compile_decoder(schema)], fake.address, 1)


@pytest.mark.parametrize("count", [0, 1, 3, MAX_PREBUILT_LIST + 6])
def test_u32_list_result_encoder_roundtrip(count: int) -> None:
    encode = values.compile_encoder(U32_LIST_RESULT)
    slot = ctypes.create_string_buffer(values.VAL_SIZE)
    for tokens in ([(5 * i) % 2**32 for i in range(count)], [2**32 - 1 - i for i in range(count)]):
        encode(("ok", tokens), ctypes.addressof(slot))  # the second time reuses the pre-built buffer
        try:
            assert values.decode_args(slot, 1)[0] == ("ok", tokens)
        finally:
            values.ffi.wasmtime_component_val_delete(ctypes.cast(slot, ctypes.POINTER(values.ffi.wasmtime_component_val_t)))


def test_u32_list_result_encoder_errors_and_bad_values() -> None:
    encode = values.compile_encoder(U32_LIST_RESULT)
    slot = ctypes.create_string_buffer(values.VAL_SIZE)
    encode(("err", "sampler 3 is not registered"), slot)
    try:
        assert values.decode_args(slot, 1)[0] == ("err", "sampler 3 is not registered")
    finally:
        values.ffi.wasmtime_component_val_delete(ctypes.cast(slot, ctypes.POINTER(values.ffi.wasmtime_component_val_t)))
    with pytest.raises(OverflowError):
        encode(("ok", [2**32]), slot)  # refused before anything is handed to wasmtime
    assert values.compile_encoder(None) is None

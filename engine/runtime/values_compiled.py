"""Decoders compiled from a parameter schema, for hot host calls: records are read positionally (field names
are not read back), lists of primitives with strided slices, and sampling-style records memoized.

Safety: a guest chooses the types of its imports (wasmtime lifts whatever the guest declared), so every
decoder checks a val's kind byte before it reads the payload or follows a pointer, and raises TypeError
on a mismatch (the call then fails; the server does not read foreign memory).
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Sequence

from pie_server.engine.runtime.values_decode import decode_prim_array, decode_val
from pie_server.engine.runtime.values_layout import (
    ENTRY_SIZE, LIST, OF, OPTION, PAIR, PRIM_FMT, PRIM_NAMES, PRIM_SIZE, Q, RECORD, STRING, U32, VAL_SIZE, VARIANT,
    address, string_at,
)

Decoder = Callable[[bytes, int], Any]
"""(buf, offset) -> value of the val at buf[offset:offset + VAL_SIZE]."""
ArgsDecoder = Callable[[int, int], list[Any]]
"""(address of the C array of argument vals, number of arguments) -> the decoded arguments."""


def _kind_error(found: int, expected: int) -> TypeError:
    return TypeError(f"component value of kind {found} where kind {expected} was expected "
                     "(the guest's import type differs from the API)")


def compile_decoder(schema: Any) -> Decoder:
    """A decoder for a known type (see values_encode.Schema), plus ("memo", record_schema, convert)."""
    if isinstance(schema, str):
        return _prim_decoder(schema)
    kind = schema[0]
    if kind == "memo":
        return _memo_decoder(schema[1], schema[2])
    if kind == "record":
        return _record_decoder(schema)
    if kind == "list" and isinstance(schema[1], str) and schema[1] in PRIM_NAMES and schema[1] != "u8":
        return _prim_list_decoder(PRIM_NAMES[schema[1]])
    if kind == "list" and schema[1] != "u8":
        return _list_decoder(compile_decoder(schema[1]))
    if kind == "option":
        return _option_decoder(compile_decoder(schema[1]))
    if kind == "variant":
        return _variant_decoder(schema[1])
    decode_list_u8 = schema == ("list", "u8")
    return (lambda buf, at: bytes(decode_val(buf, at))) if decode_list_u8 else decode_val  # generic, checked


def _prim_decoder(name: str) -> Decoder:
    if name == "string":
        def string(buf: bytes, at: int) -> str:
            if buf[at] != STRING:
                raise _kind_error(buf[at], STRING)
            return decode_val(buf, at)
        return string
    expected = PRIM_NAMES[name]
    fmt = struct.Struct("<" + PRIM_FMT[expected])

    def prim(buf: bytes, at: int) -> Any:
        if buf[at] != expected:
            raise _kind_error(buf[at], expected)
        return fmt.unpack_from(buf, at + OF)[0]
    return prim


def _prim_list_decoder(element_kind: int) -> Decoder:
    kinds = {n: bytes([element_kind]) * n for n in range(1, 65)}  # the expected kind bytes, small lists

    def prim_list(buf: bytes, at: int) -> list[Any]:
        if buf[at] != LIST:
            raise _kind_error(buf[at], LIST)
        size, ptr = PAIR.unpack_from(buf, at + OF)
        if not size:
            return []
        items = string_at(ptr, VAL_SIZE * size)
        if items[0::VAL_SIZE] != (kinds.get(size) or bytes([element_kind]) * size):
            raise TypeError(f"a list whose elements are not all of kind {element_kind}")
        if element_kind == U32:
            return memoryview(items).cast("I")[2::8].tolist()
        return decode_prim_array(items, size, element_kind)
    return prim_list


def _record_decoder(schema: tuple) -> Decoder:
    names = [name for name, _ in schema[1:]]
    decoders = [compile_decoder(t) for _, t in schema[1:]]
    fields = list(zip(range(16, ENTRY_SIZE * len(names), ENTRY_SIZE), names, decoders))
    count = len(names)

    def record(buf: bytes, at: int) -> dict[str, Any]:
        if buf[at] != RECORD:
            raise _kind_error(buf[at], RECORD)
        size, ptr = PAIR.unpack_from(buf, at + OF)
        if size != count:
            raise TypeError(f"record with {size} fields, expected {count}")
        entries = string_at(ptr, ENTRY_SIZE * count)
        return {name: dec(entries, offset) for offset, name, dec in fields}
    return record


def _list_decoder(element: Decoder) -> Decoder:
    def list_of(buf: bytes, at: int) -> list[Any]:
        if buf[at] != LIST:
            raise _kind_error(buf[at], LIST)
        size, ptr = PAIR.unpack_from(buf, at + OF)
        items = string_at(ptr, VAL_SIZE * size) if size else b""
        return [element(items, VAL_SIZE * i) for i in range(size)]
    return list_of


def _option_decoder(inner: Decoder) -> Decoder:
    def option(buf: bytes, at: int) -> Any:
        if buf[at] != OPTION:
            raise _kind_error(buf[at], OPTION)
        ptr = Q.unpack_from(buf, at + OF)[0]
        return inner(string_at(ptr, VAL_SIZE), 0) if ptr else None
    return option


def _variant_decoder(cases_schema: dict[str, Any]) -> Decoder:
    cases = {name.encode(): (name, None if t is None else compile_decoder(t)) for name, t in cases_schema.items()}

    def variant(buf: bytes, at: int) -> tuple[str, Any]:
        if buf[at] != VARIANT:
            raise _kind_error(buf[at], VARIANT)
        size, ptr, payload = struct.unpack_from("<QQQ", buf, at + OF)
        found = cases.get(string_at(ptr, size))
        if found is None:
            raise TypeError("unknown variant case")
        name, dec = found
        if dec is None:
            return (name, None)
        if not payload:
            raise TypeError(f"variant case {name} without its payload")
        return (name, dec(string_at(payload, VAL_SIZE), 0))
    return variant


MEMO_CAPACITY = 1024


def _memo_masks(record_schema: tuple) -> tuple[int, int] | None:
    """(key mask, nested-data mask) over a record's entries array, as little-endian integers: the key keeps
    each field's kind byte and value bytes (a val's other bytes are arbitrary: padding, unused union space,
    an empty list's dangling pointer); nested data (a non-empty list, a some(...)) shows in the second mask.
    None if a field's type cannot be keyed this way (strings, records, variants, ...)."""
    key_mask = nested_mask = 0
    for i, (_, field) in enumerate(record_schema[1:]):
        at = i * ENTRY_SIZE + 16
        key_mask |= 0xFF << (8 * at)
        if isinstance(field, str) and field in PRIM_NAMES:
            width = PRIM_SIZE[PRIM_NAMES[field]]
            key_mask |= ((1 << (8 * width)) - 1) << (8 * (at + OF))
        elif isinstance(field, tuple) and field[0] in ("list", "option"):
            nested_mask |= ((1 << 64) - 1) << (8 * (at + OF))  # the list's size, or the option's pointer
        else:
            return None
    return key_mask, nested_mask


def _memo_decoder(record_schema: tuple, convert: Callable[[dict[str, Any]], Any]) -> Decoder:
    """("memo", record_schema, convert): decode a record and convert it, remembering the conversion for
    records without nested data (every list empty, every option none), which are equal exactly when their
    masked bytes are (the key includes every kind byte, so a record of other types never hits).
    For the sampling params that come with every forward."""
    decode = compile_decoder(record_schema)
    count = len(record_schema) - 1
    masks = _memo_masks(record_schema)
    if masks is None:
        raise TypeError("memo needs a record of primitives, lists and options")
    key_mask, nested_mask = masks
    cache: dict[int, Any] = {}

    def memo(buf: bytes, at: int) -> Any:
        if buf[at] != RECORD:
            raise _kind_error(buf[at], RECORD)
        size, ptr = PAIR.unpack_from(buf, at + OF)
        if size != count:
            raise TypeError(f"record with {size} fields, expected {count}")
        raw = int.from_bytes(string_at(ptr, ENTRY_SIZE * count), "little")
        if raw & nested_mask:
            return convert(decode(buf, at))
        key = raw & key_mask
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= MEMO_CAPACITY:
                cache.clear()
            hit = cache[key] = convert(decode(buf, at))
        return hit
    return memo


MAX_CACHED_LIST = 1024
_u32_unpackers: dict[int, struct.Struct] = {}  # size -> the unpacker of `size` u32 vals


def _u32_unpacker(size: int) -> struct.Struct:
    unpacker = _u32_unpackers.get(size)
    if unpacker is None:
        unpacker = struct.Struct("<" + "8xI20x" * size)
        if size <= MAX_CACHED_LIST:
            _u32_unpackers[size] = unpacker
    return unpacker


def read_u32_list(size: int, ptr: int) -> tuple[int, ...]:
    """The elements of a list val's (size, ptr) payload, checked to be u32 vals (a list's elements share
    one type, so the first one's kind tells). A tuple: once the GC has seen that it holds only ints it stops
    tracking it (lists of pending forwards would be traversed by every collection until the step ran)."""
    if not size:
        return ()
    items = string_at(ptr, VAL_SIZE * size)
    if items[0] != U32:
        raise TypeError("a list<u32> argument holds other values (the guest's import type differs from the API)")
    return (_u32_unpackers.get(size) or _u32_unpacker(size)).unpack(items)


def compile_args(params: Sequence[Any]) -> ArgsDecoder:
    """The argument decoder of a host function. Flat signatures of u32 and list<u32> only (the per-token
    calls) read every argument's head with one struct unpack and each non-empty list with one copy (lists
    come as tuples, see read_u32_list); others decode argument by argument."""
    if not all(p == "u32" or p == ("list", "u32") for p in params):
        decoders = [compile_decoder(p) for p in params]
        return lambda args, num_args: decode_args_with(decoders, args, num_args)
    count = len(params)
    is_list = [p != "u32" for p in params]
    expected_kinds = bytes(LIST if listed else U32 for listed in is_list)
    heads = struct.Struct("<" + "".join("8xQQ8x" if listed else "8xI20x" for listed in is_list))
    # where each argument's head starts among the unpacked fields: a list has (size, ptr), a u32 one value
    starts = [sum(2 if listed else 1 for listed in is_list[:i]) for i in range(count)]
    plan = list(zip(starts, is_list))
    unpackers = _u32_unpackers

    def flat(args: int, num_args: int) -> list[Any]:
        if num_args != count:
            raise TypeError(f"{num_args} arguments, expected {count}")
        buf = string_at(args, VAL_SIZE * count)
        if buf[0::VAL_SIZE] != expected_kinds:
            raise TypeError("the arguments' kinds differ from the API (the guest's import type differs)")
        fields = heads.unpack(buf)
        arguments: list[Any] = []
        for start, listed in plan:  # read_u32_list inlined: this runs for every per-token call
            size = fields[start]
            if not listed:
                arguments.append(size)
            elif not size:
                arguments.append(())
            else:
                items = string_at(fields[start + 1], VAL_SIZE * size)
                if items[0] != U32:
                    raise TypeError("a list<u32> argument holds other values (the guest's import type differs)")
                arguments.append((unpackers.get(size) or _u32_unpacker(size)).unpack(items))
        return arguments
    return flat


def decode_args_with(decoders: Sequence[Decoder], args_ptr: Any, num_args: int) -> list[Any]:
    if num_args != len(decoders):
        raise TypeError(f"{num_args} arguments, expected {len(decoders)}")
    if not num_args:
        return []
    buf = string_at(address(args_ptr), VAL_SIZE * num_args)
    return [dec(buf, VAL_SIZE * i) for i, dec in enumerate(decoders)]

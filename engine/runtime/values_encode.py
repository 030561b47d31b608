"""Encoding Python values as wasmtime's C component values, following a schema.

A result is built in one Python buffer with relative pointers (an arena) and deep-copied by wasmtime in a
single call (`wasmtime_component_val_clone`), so wasmtime owns (and later frees) what it receives. Hot
results skip even that: a Template patches the primitives of a pre-built arena, and `compile_encoder`
gives results of shape `result<list<u32>, string>` a pre-built buffer per list length.
"""
from __future__ import annotations

import ctypes
import struct
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from pie_server.engine.runtime.values_layout import (
    BOOL, ENTRY_SIZE, ENUM, F32, F64, LIST, OF, OPTION, PAIR, PRIM_FMT, PRIM_NAMES, Q, RECORD, RESOURCE, RESULT,
    S32, S64, STRING, TUPLE, U8, U32, U64, VAL_SIZE, VARIANT, address, val_clone,
)

Schema = Union[str, tuple]
"""'u32', 'string', ... | ('list', T) | ('option', T) | ('result', OkT|None, ErrT|None) | ('tuple', T, ...)
| ('record', (name, T), ...) | ('variant', {case: T|None}) | ('enum',) | ('own',) (value: ResourceRef)."""

Encoder = Callable[[Any, Any], None]
"""(value, out) -> None: writes value as the val at `out` (an int address or a ctypes pointer/buffer)."""

_static_names: dict[bytes, tuple[int, Any]] = {}  # interned names: never freed, read (cloned) by wasmtime


def _name(name: str) -> int:
    """The address of a permanent copy of name (field, case and enum names: a small fixed set)."""
    data = name.encode()
    entry = _static_names.get(data)
    if entry is None:
        buffer = ctypes.create_string_buffer(data, max(1, len(data)))
        entry = _static_names[data] = (ctypes.addressof(buffer), buffer)
    return entry[0]


class _Arena:
    """A value tree built in one Python buffer with relative pointers; wasmtime deep-clones it in one call.

    Invariant: every pointer slot to arena memory is listed in `fixups` and holds an offset until
    `address()` rebases it; pointers to interned names are absolute already.
    """

    def __init__(self) -> None:
        self.buf = bytearray(VAL_SIZE)  # the root val at offset 0
        self.fixups: list[int] = []
        self.prim_slots: list[tuple[int, str]] = []  # (offset, struct format) of every primitive written

    def alloc(self, size: int) -> int:
        offset = len(self.buf)
        self.buf.extend(bytes(size + (-size) % 8))
        return offset

    def pointer(self, slot: int, offset: int) -> None:
        Q.pack_into(self.buf, slot, offset)
        self.fixups.append(slot)

    def address(self) -> tuple[int, Any]:
        view = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        base = ctypes.addressof(view)
        for slot in self.fixups:
            Q.pack_into(self.buf, slot, base + Q.unpack_from(self.buf, slot)[0])
        return base, view

    def clone_into(self, out: Any) -> None:
        base, view = self.address()
        val_clone(base, address(out))
        del view


def encode_into(schema: Schema, value: Any, out_ptr: Any) -> None:
    """Encode `value` as the single result at `out_ptr` (a `wasmtime_component_val_t *` or its address)."""
    if isinstance(value, Prepared):
        value.template.encode_into(value.primitives, out_ptr)
        return
    if isinstance(schema, tuple) and schema[0] == "own":
        ctypes.memmove(address(out_ptr), struct.pack("<B7xQ16x", RESOURCE, value.address), VAL_SIZE)
        return
    arena = _Arena()
    _encode(schema, value, arena, 0)
    arena.clone_into(out_ptr)


def _encode(schema: Schema, value: Any, arena: _Arena, at: int) -> None:
    if isinstance(schema, str):
        if schema == "string":
            _encode_bytes(STRING, value.encode("utf-8"), arena, at)
            return
        kind = PRIM_NAMES[schema]
        arena.buf[at] = kind
        struct.pack_into("<" + PRIM_FMT[kind], arena.buf, at + OF, value)
        arena.prim_slots.append((at + OF, "<" + PRIM_FMT[kind]))
        return
    _COMPOSITE[schema[0]](schema, value, arena, at)


def _encode_bytes(kind: int, data: bytes, arena: _Arena, at: int) -> None:
    arena.buf[at] = kind
    if data:
        offset = arena.alloc(len(data))
        arena.buf[offset:offset + len(data)] = data
        Q.pack_into(arena.buf, at + OF, len(data))
        arena.pointer(at + 16, offset)


def _enc_list(schema: tuple, value: Sequence[Any], arena: _Arena, at: int) -> None:
    element, count = schema[1], len(value)
    arena.buf[at] = LIST
    if not count:
        return  # size 0 and a null pointer: an empty list
    offset = arena.alloc(VAL_SIZE * count)
    if isinstance(element, str) and element in PRIM_NAMES:
        arena.buf[offset:offset + VAL_SIZE * count] = _prim_list_image(PRIM_NAMES[element], value)
    else:
        for i, item in enumerate(value):
            _encode(element, item, arena, offset + VAL_SIZE * i)
    Q.pack_into(arena.buf, at + OF, count)
    arena.pointer(at + 16, offset)


def _prim_list_image(kind: int, values: Sequence[Any]) -> bytes:
    """count vals of one primitive kind, built with strided slices instead of one pack per element."""
    count = len(values)
    buf = bytearray(VAL_SIZE * count)
    buf[0::VAL_SIZE] = bytes([kind]) * count
    if kind in (U32, S32, F32):
        code = {U32: "I", S32: "i", F32: "f"}[kind]
        memoryview(buf).cast(code)[2::8] = array(code, values)
    elif kind in (U64, S64, F64):
        code = {U64: "Q", S64: "q", F64: "d"}[kind]
        memoryview(buf).cast(code)[1::4] = array(code, values)
    elif kind in (U8, BOOL):
        buf[OF::VAL_SIZE] = bytes(values)
    else:
        for i, v in enumerate(values):
            struct.pack_into("<" + PRIM_FMT[kind], buf, i * VAL_SIZE + OF, v)
    return bytes(buf)


def _enc_tuple(schema: tuple, value: Sequence[Any], arena: _Arena, at: int) -> None:
    elements = schema[1:]
    if len(value) != len(elements):
        raise TypeError(f"expected a {len(elements)}-tuple")
    offset = arena.alloc(VAL_SIZE * len(elements))
    for i, (element, item) in enumerate(zip(elements, value)):
        _encode(element, item, arena, offset + VAL_SIZE * i)
    arena.buf[at] = TUPLE
    Q.pack_into(arena.buf, at + OF, len(elements))
    arena.pointer(at + 16, offset)


def _enc_record(schema: tuple, value: Any, arena: _Arena, at: int) -> None:
    fields = schema[1:]
    offset = arena.alloc(ENTRY_SIZE * len(fields))
    for i, (name, field_schema) in enumerate(fields):
        entry = offset + ENTRY_SIZE * i
        PAIR.pack_into(arena.buf, entry, len(name), _name(name))
        _encode(field_schema, value[name], arena, entry + 16)
    arena.buf[at] = RECORD
    Q.pack_into(arena.buf, at + OF, len(fields))
    arena.pointer(at + 16, offset)


def _boxed(schema: Schema | None, value: Any, arena: _Arena, slot: int) -> None:
    if schema is not None:
        offset = arena.alloc(VAL_SIZE)
        _encode(schema, value, arena, offset)
        arena.pointer(slot, offset)


def _enc_option(schema: tuple, value: Any, arena: _Arena, at: int) -> None:
    arena.buf[at] = OPTION
    if value is not None:
        _boxed(schema[1], value, arena, at + OF)


def _enc_result(schema: tuple, value: tuple[str, Any], arena: _Arena, at: int) -> None:
    tag, payload = value
    if tag not in ("ok", "err"):
        raise TypeError(f"a result is ('ok', v) or ('err', v), got tag {tag!r}")
    arena.buf[at] = RESULT
    arena.buf[at + OF] = tag == "ok"
    _boxed(schema[1] if tag == "ok" else schema[2], payload, arena, at + 16)


def _enc_variant(schema: tuple, value: tuple[str, Any], arena: _Arena, at: int) -> None:
    case, payload = value
    cases: dict[str, Schema | None] = schema[1]
    if case not in cases:
        raise TypeError(f"unknown variant case {case!r}")
    arena.buf[at] = VARIANT
    PAIR.pack_into(arena.buf, at + OF, len(case), _name(case))
    _boxed(cases[case], payload, arena, at + 24)


def _enc_enum(schema: tuple, value: str, arena: _Arena, at: int) -> None:
    arena.buf[at] = ENUM
    PAIR.pack_into(arena.buf, at + OF, len(value), _name(value))


_COMPOSITE: dict[str, Callable[[tuple, Any, _Arena, int], None]] = {
    "list": _enc_list, "tuple": _enc_tuple, "record": _enc_record, "option": _enc_option,
    "result": _enc_result, "variant": _enc_variant, "enum": _enc_enum,
}


# --------------------------------------------------------------------------------- pre-built results

@dataclass(frozen=True)
class Prepared:
    """A host function's result already bound to a Template (encode_into uses the template)."""

    template: "Template"
    primitives: Sequence[Any]


class Template:
    """Encodes values of one fixed shape (same list lengths, same options present) by patching the primitives
    of a pre-built arena: for results sent on every forward. `primitives` are given in encoding order
    (depth first, record fields in schema order); lists of primitives count as one opaque blob."""

    def __init__(self, schema: Schema, example: Any) -> None:
        arena = _Arena()
        _encode(schema, example, arena, 0)
        self._image = bytes(arena.buf)
        self._fixups = tuple(arena.fixups)
        self._offsets = tuple(offset for offset, _ in arena.prim_slots)
        self._formats = tuple(struct.Struct(fmt) for _, fmt in arena.prim_slots)

    def encode_into(self, primitives: Sequence[Any], out_ptr: Any) -> None:
        arena = _Arena.__new__(_Arena)
        arena.buf = bytearray(self._image)
        arena.fixups = list(self._fixups)
        for offset, fmt, value in zip(self._offsets, self._formats, primitives):
            fmt.pack_into(arena.buf, offset, value)
        arena.clone_into(out_ptr)


U32_LIST_RESULT = ("result", ("list", "u32"), "string")
MAX_PREBUILT_LIST = 64


class _U32ListResult:
    """Encoder of `result<list<u32>, string>`: ok values go through one pre-built C buffer per list length
    (root result val, list val, then the element vals; absolute pointers, written once), patched in place
    with one strided slice assignment and deep-copied by wasmtime. Errors take the generic path.
    One encoder serves one scheduler thread (the buffers are reused)."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[Any, memoryview, int]] = {}

    def _buffer(self, count: int) -> tuple[Any, memoryview, int]:
        buffer = ctypes.create_string_buffer(VAL_SIZE * (2 + count))
        base = ctypes.addressof(buffer)
        struct.pack_into("<B7xBxxxxxxxQ", buffer, 0, RESULT, 1, base + VAL_SIZE)
        struct.pack_into("<B7xQQ", buffer, VAL_SIZE, LIST, count, base + 2 * VAL_SIZE if count else 0)
        for i in range(count):
            buffer[VAL_SIZE * (2 + i)] = U32
        entry = (buffer, memoryview(buffer).cast("B").cast("I"), base)
        if count <= MAX_PREBUILT_LIST:
            self._buffers[count] = entry
        return entry

    def __call__(self, value: Any, out: Any) -> None:
        tag, items = value
        if tag != "ok":
            encode_into(U32_LIST_RESULT, value, out)
            return
        count = len(items)
        entry = self._buffers.get(count)
        if entry is None:
            entry = self._buffer(count)
        _, words, base = entry
        if count:
            words[2 * VAL_SIZE // 4 + 2::VAL_SIZE // 4] = array("I", items)
        val_clone(base, out if isinstance(out, int) else address(out))


def compile_encoder(schema: Schema | None) -> Encoder | None:
    """The encoder for results of `schema` (None for a function without result)."""
    if schema is None:
        return None
    if schema == U32_LIST_RESULT:
        return _U32ListResult()
    return lambda value, out: encode_into(schema, value, out)

"""Fast conversion between wasmtime's C component values and Python values.

wasmtime-py's generic converters query the function type through FFI on every call (tens of us for a
record). The host knows its WIT types statically, so:
- decoding reads the self-describing C values directly (one `string_at` per array), and
- encoding follows a small schema written next to each host function.

Layout facts (wasmtime 50 C API, checked at import): a `wasmtime_component_val_t` is 32 bytes, kind (u8) at
offset 0, payload at offset 8; a record entry is 48 bytes, name (size, ptr) at 0, value at 16.
Ownership: decoded arguments stay owned by wasmtime (we only read them); encoded results are allocated with
wasmtime's own allocators and handed over (wasmtime frees them after converting).

Python shapes: record -> dict keyed by WIT field name; variant -> (case, payload|None); enum -> str;
option -> value|None; result -> ("ok"|"err", value|None); tuple -> tuple; list<u8> -> bytes;
other lists -> list; resource -> ResourceRef (the raw resource pointer, valid during the call).
"""
from __future__ import annotations

import ctypes
import struct
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from wasmtime import _ffi as ffi

VAL_SIZE = 32
ENTRY_SIZE = 48
_OF = 8
assert ctypes.sizeof(ffi.wasmtime_component_val_t) == VAL_SIZE
assert ffi.wasmtime_component_val_t.of.offset == _OF
assert ctypes.sizeof(ffi.wasmtime_component_valrecord_entry) == ENTRY_SIZE

BOOL, S8, U8, S16, U16, S32, U32, S64, U64, F32, F64, CHAR, STRING = range(13)
LIST, RECORD, TUPLE, VARIANT, ENUM, OPTION, RESULT, FLAGS, RESOURCE = range(13, 22)

_PRIM_FMT = {BOOL: "?", S8: "b", U8: "B", S16: "h", U16: "H", S32: "i", U32: "I", S64: "q", U64: "Q",
             F32: "f", F64: "d", CHAR: "I"}
_PRIM_NAMES = {"bool": BOOL, "s8": S8, "u8": U8, "s16": S16, "u16": U16, "s32": S32, "u32": U32,
               "s64": S64, "u64": U64, "f32": F32, "f64": F64}
_PAIR = struct.Struct("<QQ")
_string_at = ctypes.string_at


@dataclass(frozen=True)
class ResourceRef:
    """A resource argument: the address of its `wasmtime_component_resource_any_t`."""

    address: int


# ---------------------------------------------------------------------------------------------- decoding

def decode_args(args_ptr: Any, num_args: int) -> list[Any]:
    """Decode a host call's arguments (a C array of vals)."""
    if num_args == 0:
        return []
    address = ctypes.cast(args_ptr, ctypes.c_void_p).value or 0
    return _decode_array(_string_at(address, VAL_SIZE * num_args), num_args)


def _decode_array(buf: bytes, count: int) -> list[Any]:
    if count and buf[0] in _PRIM_FMT and all(buf[i * VAL_SIZE] == buf[0] for i in range(count)):
        return _decode_prim_array(buf, count, buf[0])
    return [_decode(buf, i * VAL_SIZE) for i in range(count)]


def _decode_prim_array(buf: bytes, count: int, kind: int) -> list[Any]:
    if kind in (U32, S32, F32, CHAR):
        words = memoryview(buf).cast("I" if kind != F32 else "f") if kind != S32 else memoryview(buf).cast("i")
        return list(words[2::8])
    if kind in (U64, S64, F64):
        return list(memoryview(buf).cast({U64: "Q", S64: "q", F64: "d"}[kind])[1::4])
    if kind == BOOL:
        return [b != 0 for b in buf[_OF::VAL_SIZE]]
    if kind == U8:
        return list(buf[_OF::VAL_SIZE])
    fmt = "<" + _PRIM_FMT[kind]
    return [struct.unpack_from(fmt, buf, i * VAL_SIZE + _OF)[0] for i in range(count)]


def _decode(buf: bytes, offset: int) -> Any:
    kind = buf[offset]
    at = offset + _OF
    if kind in _PRIM_FMT:
        value = struct.unpack_from("<" + _PRIM_FMT[kind], buf, at)[0]
        return chr(value) if kind == CHAR else value
    if kind in (STRING, ENUM):
        size, ptr = _PAIR.unpack_from(buf, at)
        return _string_at(ptr, size).decode("utf-8") if size else ""
    if kind in (LIST, TUPLE):
        size, ptr = _PAIR.unpack_from(buf, at)
        items = _decode_array(_string_at(ptr, VAL_SIZE * size), size) if size else []
        if kind == TUPLE:
            return tuple(items)
        if size and buf and _string_at(ptr, 1)[0] == U8:
            return bytes(items)
        return items
    if kind == RECORD:
        size, ptr = _PAIR.unpack_from(buf, at)
        entries = _string_at(ptr, ENTRY_SIZE * size) if size else b""
        record = {}
        for i in range(size):
            name_size, name_ptr = _PAIR.unpack_from(entries, i * ENTRY_SIZE)
            record[_string_at(name_ptr, name_size).decode()] = _decode(entries, i * ENTRY_SIZE + 16)
        return record
    if kind == VARIANT:
        size, ptr = _PAIR.unpack_from(buf, at)
        payload_ptr = struct.unpack_from("<Q", buf, at + 16)[0]
        return (_string_at(ptr, size).decode(), _decode_ptr(payload_ptr))
    if kind == OPTION:
        return _decode_ptr(struct.unpack_from("<Q", buf, at)[0])
    if kind == RESULT:
        is_ok = buf[at] != 0
        return ("ok" if is_ok else "err", _decode_ptr(struct.unpack_from("<Q", buf, at + 8)[0]))
    if kind == RESOURCE:
        return ResourceRef(struct.unpack_from("<Q", buf, at)[0])
    raise TypeError(f"unsupported component value kind {kind}")


def _decode_ptr(ptr: int) -> Any:
    return _decode(_string_at(ptr, VAL_SIZE), 0) if ptr else None


# ---------------------------------------------------------------------------------------------- encoding

Schema = Union[str, tuple]
"""'u32', 'string', ... | ('list', T) | ('option', T) | ('result', OkT|None, ErrT|None) | ('tuple', T, ...)
| ('record', (name, T), ...) | ('variant', {case: T|None}) | ('enum',) | ('own',) (value: ResourceRef)."""

_val_clone = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(("wasmtime_component_val_clone", ffi.dll))
_Q = struct.Struct("<Q")
_HEAD = struct.Struct("<B7xQQ")  # kind, then two words of payload (size, ptr)
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
        _Q.pack_into(self.buf, slot, offset)
        self.fixups.append(slot)

    def address(self) -> tuple[int, Any]:
        view = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        base = ctypes.addressof(view)
        for slot in self.fixups:
            _Q.pack_into(self.buf, slot, base + _Q.unpack_from(self.buf, slot)[0])
        return base, view


def encode_into(schema: Schema, value: Any, out_ptr: Any) -> None:
    """Encode `value` as the single result at `out_ptr` (a `wasmtime_component_val_t *`)."""
    if isinstance(value, Prepared):
        value.template.encode_into(value.primitives, out_ptr)
        return
    if isinstance(schema, tuple) and schema[0] == "own":
        ctypes.memmove(out_ptr, struct.pack("<B7xQ16x", RESOURCE, value.address), VAL_SIZE)
        return
    arena = _Arena()
    _encode(schema, value, arena, 0)
    base, view = arena.address()
    _val_clone(base, ctypes.cast(out_ptr, ctypes.c_void_p).value)
    del view


def _encode(schema: Schema, value: Any, arena: _Arena, at: int) -> None:
    if isinstance(schema, str):
        if schema == "string":
            _encode_bytes(STRING, value.encode("utf-8"), arena, at)
            return
        kind = _PRIM_NAMES[schema]
        arena.buf[at] = kind
        struct.pack_into("<" + _PRIM_FMT[kind], arena.buf, at + _OF, value)
        arena.prim_slots.append((at + _OF, "<" + _PRIM_FMT[kind]))
        return
    _COMPOSITE[schema[0]](schema, value, arena, at)


def _encode_bytes(kind: int, data: bytes, arena: _Arena, at: int) -> None:
    arena.buf[at] = kind
    if data:
        offset = arena.alloc(len(data))
        arena.buf[offset:offset + len(data)] = data
        _Q.pack_into(arena.buf, at + _OF, len(data))
        arena.pointer(at + 16, offset)


def _enc_list(schema: tuple, value: Sequence[Any], arena: _Arena, at: int) -> None:
    element, count = schema[1], len(value)
    arena.buf[at] = LIST
    if not count:
        return  # size 0 and a null pointer: an empty list
    offset = arena.alloc(VAL_SIZE * count)
    if isinstance(element, str) and element in _PRIM_NAMES:
        arena.buf[offset:offset + VAL_SIZE * count] = _prim_list_image(_PRIM_NAMES[element], value)
    else:
        for i, item in enumerate(value):
            _encode(element, item, arena, offset + VAL_SIZE * i)
    _Q.pack_into(arena.buf, at + _OF, count)
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
        buf[_OF::VAL_SIZE] = bytes(values)
    else:
        for i, v in enumerate(values):
            struct.pack_into("<" + _PRIM_FMT[kind], buf, i * VAL_SIZE + _OF, v)
    return bytes(buf)


def _enc_tuple(schema: tuple, value: Sequence[Any], arena: _Arena, at: int) -> None:
    elements = schema[1:]
    if len(value) != len(elements):
        raise TypeError(f"expected a {len(elements)}-tuple")
    offset = arena.alloc(VAL_SIZE * len(elements))
    for i, (element, item) in enumerate(zip(elements, value)):
        _encode(element, item, arena, offset + VAL_SIZE * i)
    arena.buf[at] = TUPLE
    _Q.pack_into(arena.buf, at + _OF, len(elements))
    arena.pointer(at + 16, offset)


def _enc_record(schema: tuple, value: Any, arena: _Arena, at: int) -> None:
    fields = schema[1:]
    offset = arena.alloc(ENTRY_SIZE * len(fields))
    for i, (name, field_schema) in enumerate(fields):
        entry = offset + ENTRY_SIZE * i
        _PAIR.pack_into(arena.buf, entry, len(name), _name(name))
        _encode(field_schema, value[name], arena, entry + 16)
    arena.buf[at] = RECORD
    _Q.pack_into(arena.buf, at + _OF, len(fields))
    arena.pointer(at + 16, offset)


def _boxed(schema: Schema | None, value: Any, arena: _Arena, slot: int) -> None:
    if schema is not None:
        offset = arena.alloc(VAL_SIZE)
        _encode(schema, value, arena, offset)
        arena.pointer(slot, offset)


def _enc_option(schema: tuple, value: Any, arena: _Arena, at: int) -> None:
    arena.buf[at] = OPTION
    if value is not None:
        _boxed(schema[1], value, arena, at + _OF)


def _enc_result(schema: tuple, value: tuple[str, Any], arena: _Arena, at: int) -> None:
    tag, payload = value
    if tag not in ("ok", "err"):
        raise TypeError(f"a result is ('ok', v) or ('err', v), got tag {tag!r}")
    arena.buf[at] = RESULT
    arena.buf[at + _OF] = tag == "ok"
    _boxed(schema[1] if tag == "ok" else schema[2], payload, arena, at + 16)


def _enc_variant(schema: tuple, value: tuple[str, Any], arena: _Arena, at: int) -> None:
    case, payload = value
    cases: dict[str, Schema | None] = schema[1]
    if case not in cases:
        raise TypeError(f"unknown variant case {case!r}")
    arena.buf[at] = VARIANT
    _PAIR.pack_into(arena.buf, at + _OF, len(case), _name(case))
    _boxed(cases[case], payload, arena, at + 24)


def _enc_enum(schema: tuple, value: str, arena: _Arena, at: int) -> None:
    arena.buf[at] = ENUM
    _PAIR.pack_into(arena.buf, at + _OF, len(value), _name(value))


_COMPOSITE: dict[str, Callable[[tuple, Any, _Arena, int], None]] = {
    "list": _enc_list, "tuple": _enc_tuple, "record": _enc_record, "option": _enc_option,
    "result": _enc_result, "variant": _enc_variant, "enum": _enc_enum,
}


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
        base, view = arena.address()
        _val_clone(base, ctypes.cast(out_ptr, ctypes.c_void_p).value)
        del view


# ---------------------------------------------------------------------------------- compiled decoding

Decoder = Callable[[bytes, int], Any]


def compile_decoder(schema: Schema) -> Decoder:
    """A decoder for a known type: records are read positionally (field names are not read back)."""
    if isinstance(schema, str):
        if schema == "string":
            return _decode
        fmt = struct.Struct("<" + _PRIM_FMT[_PRIM_NAMES[schema]])
        return lambda buf, at: fmt.unpack_from(buf, at + _OF)[0]
    kind = schema[0]
    if kind == "memo":
        return _memo_decoder(schema[1], schema[2])
    if kind == "record":
        names = [name for name, _ in schema[1:]]
        decoders = [compile_decoder(t) for _, t in schema[1:]]
        count = len(names)

        def record(buf: bytes, at: int) -> dict[str, Any]:
            size, ptr = _PAIR.unpack_from(buf, at + _OF)
            if size != count:
                raise TypeError(f"record with {size} fields, expected {count}")
            entries = _string_at(ptr, ENTRY_SIZE * count)
            return {name: dec(entries, ENTRY_SIZE * i + 16) for i, (name, dec) in enumerate(zip(names, decoders))}
        return record
    if kind == "list" and schema[1] == "u8":
        return lambda buf, at: bytes(_decode(buf, at))
    if kind == "list" and not (isinstance(schema[1], str) and schema[1] in _PRIM_NAMES):
        element = compile_decoder(schema[1])

        def list_of(buf: bytes, at: int) -> list[Any]:
            size, ptr = _PAIR.unpack_from(buf, at + _OF)
            items = _string_at(ptr, VAL_SIZE * size) if size else b""
            return [element(items, VAL_SIZE * i) for i in range(size)]
        return list_of
    if kind == "option":
        inner = compile_decoder(schema[1])

        def option(buf: bytes, at: int) -> Any:
            ptr = _Q.unpack_from(buf, at + _OF)[0]
            return inner(_string_at(ptr, VAL_SIZE), 0) if ptr else None
        return option
    if kind == "variant":
        cases = {name: (None if t is None else compile_decoder(t)) for name, t in schema[1].items()}

        def variant(buf: bytes, at: int) -> tuple[str, Any]:
            size, ptr, payload = struct.unpack_from("<QQQ", buf, at + _OF)
            case = _string_at(ptr, size).decode()
            dec = cases[case]
            return (case, dec(_string_at(payload, VAL_SIZE), 0) if dec is not None and payload else None)
        return variant
    return _decode  # prim lists, tuples, enums, results: the generic reader is as fast


_PRIM_SIZE = {kind: struct.calcsize("<" + fmt) for kind, fmt in _PRIM_FMT.items()}
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
        if isinstance(field, str) and field in _PRIM_NAMES:
            width = _PRIM_SIZE[_PRIM_NAMES[field]]
            key_mask |= ((1 << (8 * width)) - 1) << (8 * (at + _OF))
        elif isinstance(field, tuple) and field[0] in ("list", "option"):
            nested_mask |= ((1 << 64) - 1) << (8 * (at + _OF))  # the list's size, or the option's pointer
        else:
            return None
    return key_mask, nested_mask


def _memo_decoder(record_schema: tuple, convert: Callable[[dict[str, Any]], Any]) -> Decoder:
    """("memo", record_schema, convert): decode a record and convert it, remembering the conversion for
    records without nested data (every list empty, every option none), which are equal exactly when their
    masked bytes are. For the sampling params that come with every forward."""
    decode = compile_decoder(record_schema)
    count = len(record_schema) - 1
    masks = _memo_masks(record_schema)
    if masks is None:
        raise TypeError("memo needs a record of primitives, lists and options")
    key_mask, nested_mask = masks
    cache: dict[int, Any] = {}

    def memo(buf: bytes, at: int) -> Any:
        size, ptr = _PAIR.unpack_from(buf, at + _OF)
        if size != count:
            raise TypeError(f"record with {size} fields, expected {count}")
        raw = int.from_bytes(_string_at(ptr, ENTRY_SIZE * count), "little")
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


def decode_args_with(decoders: Sequence[Decoder], args_ptr: Any, num_args: int) -> list[Any]:
    if num_args != len(decoders):
        raise TypeError(f"{num_args} arguments, expected {len(decoders)}")
    if not num_args:
        return []
    buf = _string_at(ctypes.cast(args_ptr, ctypes.c_void_p).value or 0, VAL_SIZE * num_args)
    return [dec(buf, VAL_SIZE * i) for i, dec in enumerate(decoders)]


def decode_raw_val(val: Any) -> Any:
    """Decode a val owned by the caller (e.g. a call's result), then free its contents."""
    try:
        return _decode(_string_at(ctypes.addressof(val), VAL_SIZE), 0)
    finally:
        ffi.wasmtime_component_val_delete(ctypes.byref(val))

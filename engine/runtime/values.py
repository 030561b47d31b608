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


def encode_into(schema: Schema, value: Any, out_ptr: Any) -> None:
    """Encode `value` as the single result at `out_ptr` (a `wasmtime_component_val_t *`)."""
    image = encode(schema, value)
    ctypes.memmove(out_ptr, image, VAL_SIZE)


def encode(schema: Schema, value: Any) -> bytes:
    """The 32-byte image of a val; nested data is allocated with wasmtime's allocators."""
    if isinstance(schema, str):
        return _ENCODERS[schema](value)
    return _COMPOSITE[schema[0]](schema, value)


def _prim(kind: int, fmt: str) -> Callable[[Any], bytes]:
    packer = struct.Struct("<B7x" + fmt)

    def enc(value: Any) -> bytes:
        return packer.pack(kind, value).ljust(VAL_SIZE, b"\0")
    return enc


def _byte_vec(data: bytes) -> tuple[int, int]:
    """A wasmtime-allocated copy of data: (size, ptr)."""
    vec = ffi.wasm_byte_vec_t()
    if data:
        ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), ctypes.cast(ctypes.c_char_p(data),
                                                                         ctypes.POINTER(ffi.wasm_byte_t)))
    else:
        ffi.wasm_byte_vec_new_empty(ctypes.byref(vec))
    return vec.size, ctypes.cast(vec.data, ctypes.c_void_p).value or 0


def _enc_string(value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    size, ptr = _byte_vec(value.encode("utf-8"))
    return struct.pack("<B7xQQ8x", STRING, size, ptr)


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    name: _prim(kind, _PRIM_FMT[kind]) for name, kind in _PRIM_NAMES.items()}
_ENCODERS["string"] = _enc_string


def _new_vals(images: Sequence[bytes] | bytes, count: int) -> int:
    raw = ffi.wasmtime_component_vallist_t()
    ffi.wasmtime_component_vallist_new_uninit(ctypes.byref(raw), count)
    ptr = ctypes.cast(raw.data, ctypes.c_void_p).value or 0
    if count:
        ctypes.memmove(ptr, images if isinstance(images, bytes) else b"".join(images), VAL_SIZE * count)
    return ptr


def _prim_list_image(kind: int, values: Sequence[Any]) -> bytes:
    """count vals of one primitive kind, built with strided slices instead of one pack per element."""
    count = len(values)
    buf = bytearray(VAL_SIZE * count)
    buf[0::VAL_SIZE] = bytes([kind]) * count
    if kind in (U32, S32, F32):
        words = memoryview(buf).cast({U32: "I", S32: "i", F32: "f"}[kind])
        words[2::8] = array({U32: "I", S32: "i", F32: "f"}[kind], values)
    elif kind in (U64, S64, F64):
        words = memoryview(buf).cast({U64: "Q", S64: "q", F64: "d"}[kind])
        words[1::4] = array({U64: "Q", S64: "q", F64: "d"}[kind], values)
    elif kind in (U8, BOOL):
        buf[_OF::VAL_SIZE] = bytes(values)
    else:
        return b"".join(_prim(kind, _PRIM_FMT[kind])(v) for v in values)
    return bytes(buf)


def _enc_list(schema: tuple, value: Sequence[Any]) -> bytes:
    element = schema[1]
    count = len(value)
    if isinstance(element, str) and element in _PRIM_NAMES:
        ptr = _new_vals(_prim_list_image(_PRIM_NAMES[element], value), count)
    else:
        ptr = _new_vals([encode(element, v) for v in value], count)
    return struct.pack("<B7xQQ8x", LIST, count, ptr)


def _enc_tuple(schema: tuple, value: Sequence[Any]) -> bytes:
    elements = schema[1:]
    if len(value) != len(elements):
        raise TypeError(f"expected a {len(elements)}-tuple")
    ptr = _new_vals([encode(t, v) for t, v in zip(elements, value)], len(elements))
    return struct.pack("<B7xQQ8x", TUPLE, len(elements), ptr)


def _enc_record(schema: tuple, value: Any) -> bytes:
    fields = schema[1:]
    raw = ffi.wasmtime_component_valrecord_t()
    ffi.wasmtime_component_valrecord_new_uninit(ctypes.byref(raw), len(fields))
    ptr = ctypes.cast(raw.data, ctypes.c_void_p).value or 0
    parts = []
    for name, field_schema in fields:
        name_size, name_ptr = _byte_vec(name.encode())
        parts.append(struct.pack("<QQ", name_size, name_ptr) + encode(field_schema, value[name]))
    if fields:
        ctypes.memmove(ptr, b"".join(parts), ENTRY_SIZE * len(fields))
    return struct.pack("<B7xQQ8x", RECORD, len(fields), ptr)


def _boxed(schema: Schema | None, value: Any) -> int:
    if schema is None:
        return 0
    image = ctypes.create_string_buffer(encode(schema, value), VAL_SIZE)
    boxed = ffi.wasmtime_component_val_new(ctypes.cast(image, ctypes.POINTER(ffi.wasmtime_component_val_t)))
    return ctypes.cast(boxed, ctypes.c_void_p).value or 0


def _enc_option(schema: tuple, value: Any) -> bytes:
    return struct.pack("<B7xQ16x", OPTION, 0 if value is None else _boxed(schema[1], value))


def _enc_result(schema: tuple, value: tuple[str, Any]) -> bytes:
    tag, payload = value
    if tag not in ("ok", "err"):
        raise TypeError(f"a result is ('ok', v) or ('err', v), got tag {tag!r}")
    payload_schema = schema[1] if tag == "ok" else schema[2]
    return struct.pack("<B7x?7xQ8x", RESULT, tag == "ok", _boxed(payload_schema, payload))


def _enc_variant(schema: tuple, value: tuple[str, Any]) -> bytes:
    case, payload = value
    cases: dict[str, Schema | None] = schema[1]
    if case not in cases:
        raise TypeError(f"unknown variant case {case!r}")
    name_size, name_ptr = _byte_vec(case.encode())
    return struct.pack("<B7xQQQ", VARIANT, name_size, name_ptr, _boxed(cases[case], payload))


def _enc_enum(schema: tuple, value: str) -> bytes:
    name_size, name_ptr = _byte_vec(value.encode())
    return struct.pack("<B7xQQ8x", ENUM, name_size, name_ptr)


def _enc_own(schema: tuple, value: ResourceRef) -> bytes:
    return struct.pack("<B7xQ16x", RESOURCE, value.address)


_COMPOSITE: dict[str, Callable[[tuple, Any], bytes]] = {
    "list": _enc_list, "tuple": _enc_tuple, "record": _enc_record, "option": _enc_option,
    "result": _enc_result, "variant": _enc_variant, "enum": _enc_enum, "own": _enc_own,
}


def decode_raw_val(val: Any) -> Any:
    """Decode a val owned by the caller (e.g. a call's result), then free its contents."""
    try:
        return _decode(_string_at(ctypes.addressof(val), VAL_SIZE), 0)
    finally:
        ffi.wasmtime_component_val_delete(ctypes.byref(val))

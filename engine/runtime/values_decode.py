"""Generic decoding of wasmtime's C component values: reads the self-describing vals (kind bytes) directly.

Safety: a guest chooses the types of its imports, so a decoder never follows a pointer of a val whose kind
byte it has not checked.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

from wasmtime import _ffi as ffi

from pie_server.engine.runtime.values_layout import (
    BOOL, CHAR, ENTRY_SIZE, ENUM, F32, F64, LIST, OF, OPTION, PAIR, PRIM_FMT, RECORD, RESOURCE, RESULT, S32,
    S64, STRING, TUPLE, U8, U32, U64, VAL_SIZE, VARIANT, address, string_at,
)

@dataclass(frozen=True)
class ResourceRef:
    """A resource argument: the address of its `wasmtime_component_resource_any_t`."""

    address: int


def decode_args(args_ptr: Any, num_args: int) -> list[Any]:
    """Decode a host call's arguments (a C array of vals)."""
    if num_args == 0:
        return []
    return _decode_array(string_at(address(args_ptr), VAL_SIZE * num_args), num_args)


def _decode_array(buf: bytes, count: int) -> list[Any]:
    if count and buf[0] in PRIM_FMT and buf[0::VAL_SIZE] == bytes([buf[0]]) * count:
        return decode_prim_array(buf, count, buf[0])
    return [decode_val(buf, i * VAL_SIZE) for i in range(count)]


def decode_prim_array(buf: bytes, count: int, kind: int) -> list[Any]:
    """`count` vals of one primitive kind (the caller checked every kind byte)."""
    if kind in (U32, S32, F32, CHAR):
        words = memoryview(buf).cast("I" if kind != F32 else "f") if kind != S32 else memoryview(buf).cast("i")
        items = words[2::8].tolist()
        return [chr(c) for c in items] if kind == CHAR else items
    if kind in (U64, S64, F64):
        return memoryview(buf).cast({U64: "Q", S64: "q", F64: "d"}[kind])[1::4].tolist()
    if kind == BOOL:
        return [b != 0 for b in buf[OF::VAL_SIZE]]
    if kind == U8:
        return list(buf[OF::VAL_SIZE])
    fmt = "<" + PRIM_FMT[kind]
    return [struct.unpack_from(fmt, buf, i * VAL_SIZE + OF)[0] for i in range(count)]


def decode_val(buf: bytes, offset: int) -> Any:
    """The val at `offset` of `buf`, whatever its kind."""
    kind = buf[offset]
    at = offset + OF
    if kind in PRIM_FMT:
        value = struct.unpack_from("<" + PRIM_FMT[kind], buf, at)[0]
        return chr(value) if kind == CHAR else value
    if kind in (STRING, ENUM):
        size, ptr = PAIR.unpack_from(buf, at)
        return string_at(ptr, size).decode("utf-8") if size else ""
    if kind in (LIST, TUPLE):
        size, ptr = PAIR.unpack_from(buf, at)
        items_buf = string_at(ptr, VAL_SIZE * size) if size else b""
        items = _decode_array(items_buf, size) if size else []
        if kind == TUPLE:
            return tuple(items)
        if size and items_buf[0] == U8:
            return bytes(items)
        return items
    if kind == RECORD:
        size, ptr = PAIR.unpack_from(buf, at)
        entries = string_at(ptr, ENTRY_SIZE * size) if size else b""
        record = {}
        for i in range(size):
            name_size, name_ptr = PAIR.unpack_from(entries, i * ENTRY_SIZE)
            record[string_at(name_ptr, name_size).decode()] = decode_val(entries, i * ENTRY_SIZE + 16)
        return record
    if kind == VARIANT:
        size, ptr = PAIR.unpack_from(buf, at)
        payload_ptr = struct.unpack_from("<Q", buf, at + 16)[0]
        return (string_at(ptr, size).decode(), decode_ptr(payload_ptr))
    if kind == OPTION:
        return decode_ptr(struct.unpack_from("<Q", buf, at)[0])
    if kind == RESULT:
        is_ok = buf[at] != 0
        return ("ok" if is_ok else "err", decode_ptr(struct.unpack_from("<Q", buf, at + 8)[0]))
    if kind == RESOURCE:
        return ResourceRef(struct.unpack_from("<Q", buf, at)[0])
    raise TypeError(f"unsupported component value kind {kind}")


def decode_ptr(ptr: int) -> Any:
    return decode_val(string_at(ptr, VAL_SIZE), 0) if ptr else None


def decode_raw_val(val: Any) -> Any:
    """Decode a val owned by the caller (e.g. a call's result), then free its contents."""
    try:
        return decode_val(string_at(ctypes.addressof(val), VAL_SIZE), 0)
    finally:
        ffi.wasmtime_component_val_delete(ctypes.byref(val))


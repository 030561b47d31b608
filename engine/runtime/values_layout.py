"""Layout of wasmtime's C component values (`wasmtime_component_val_t`), shared by the value codecs.

Facts (wasmtime 50 C API, checked at import): a val is 32 bytes, kind (u8) at offset 0, payload at offset 8;
a record entry is 48 bytes, name (size, ptr) at 0, value at 16. Lists, tuples and records hold (size, ptr)
in the payload; a variant holds (name size, name ptr, payload ptr); an option (payload ptr | NULL); a result
(is_ok u8, payload ptr at +8).
"""
from __future__ import annotations

import ctypes
import struct
from typing import Any

from wasmtime import _ffi as ffi

VAL_SIZE = 32
ENTRY_SIZE = 48
OF = 8  # payload offset in a val
assert ctypes.sizeof(ffi.wasmtime_component_val_t) == VAL_SIZE
assert ffi.wasmtime_component_val_t.of.offset == OF
assert ctypes.sizeof(ffi.wasmtime_component_valrecord_entry) == ENTRY_SIZE

BOOL, S8, U8, S16, U16, S32, U32, S64, U64, F32, F64, CHAR, STRING = range(13)
LIST, RECORD, TUPLE, VARIANT, ENUM, OPTION, RESULT, FLAGS, RESOURCE = range(13, 22)

PRIM_FMT = {BOOL: "?", S8: "b", U8: "B", S16: "h", U16: "H", S32: "i", U32: "I", S64: "q", U64: "Q",
            F32: "f", F64: "d", CHAR: "I"}
PRIM_NAMES = {"bool": BOOL, "s8": S8, "u8": U8, "s16": S16, "u16": U16, "s32": S32, "u32": U32,
              "s64": S64, "u64": U64, "f32": F32, "f64": F64}
PRIM_SIZE = {kind: struct.calcsize("<" + fmt) for kind, fmt in PRIM_FMT.items()}
PAIR = struct.Struct("<QQ")
Q = struct.Struct("<Q")

# ctypes' own entry points without their Python wrappers; PYFUNCTYPE: short calls keep the GIL (no hand-over)
string_at = ctypes._string_at  # type: ignore[attr-defined]  # (address, size) -> bytes
val_clone = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(("wasmtime_component_val_clone", ffi.dll))


def address(pointer: Any) -> int:
    """An int address from an int or any ctypes pointer/buffer (tests pass buffers, the scheduler ints)."""
    if isinstance(pointer, int):
        return pointer
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def is_prim_list(schema: Any) -> bool:
    return isinstance(schema, tuple) and schema[0] == "list" and isinstance(schema[1], str) \
        and schema[1] in PRIM_NAMES

"""Fast conversion between wasmtime's C component values and Python values (the facade of three modules).

wasmtime-py's generic converters query the function type through FFI on every call (tens of us for a
record). The host knows its WIT types statically, so:
- decoding reads the self-describing C values directly (one `string_at` per array): generic here,
  compiled per parameter schema in values_compiled (for hot calls);
- encoding follows a small schema written next to each host function (values_encode).

Layout facts are in values_layout. Ownership: decoded arguments stay owned by wasmtime (we only read them);
encoded results are allocated with wasmtime's own allocators and handed over (wasmtime frees them after
converting).

Python shapes: record -> dict keyed by WIT field name; variant -> (case, payload|None); enum -> str;
option -> value|None; result -> ("ok"|"err", value|None); tuple -> tuple; list<u8> -> bytes;
other lists -> list; resource -> ResourceRef (the raw resource pointer, valid during the call).

"""
from __future__ import annotations

from wasmtime import _ffi as ffi

from pie_server.engine.runtime.values_compiled import compile_args, compile_decoder, decode_args_with
from pie_server.engine.runtime.values_decode import ResourceRef, decode_args, decode_raw_val
from pie_server.engine.runtime.values_encode import Prepared, Schema, Template, compile_encoder, encode_into
from pie_server.engine.runtime.values_layout import VAL_SIZE

__all__ = ["ffi", "VAL_SIZE", "ResourceRef", "decode_args", "decode_raw_val", "Schema", "encode_into",
           "Prepared", "Template", "compile_encoder", "compile_args", "compile_decoder",
           "decode_args_with"]

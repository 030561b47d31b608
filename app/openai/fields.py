"""Typed readers for fields of a JSON request body. Each raises a 400 ApiError naming the parameter.

JSON booleans are not numbers here (Python's bool is an int subclass; `"n": true` is rejected).
None (JSON null) means "not given" everywhere, as OpenAI's SDKs send nulls for omitted fields.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, TypeVar

from pie_server.app.errors import invalid

T = TypeVar("T")


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def get_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean, got {_type_name(value)}", name)
    return value


def get_int(body: Mapping[str, Any], name: str, default: T, lo: int | None = None,
            hi: int | None = None) -> int | T:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {_type_name(value)}", name)
    check_range(name, value, lo, hi)
    return value


def get_float(body: Mapping[str, Any], name: str, default: T, lo: float | None = None,
              hi: float | None = None, lo_open: bool = False) -> float | T:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number, got {value!r}", name)
    if lo_open and lo is not None and value <= lo:
        raise invalid(f"'{name}' must be greater than {lo}, got {value}", name)
    check_range(name, float(value), lo, hi)
    return float(value)


def get_str(body: Mapping[str, Any], name: str, default: T) -> str | T:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string, got {_type_name(value)}", name)
    return value


def get_list(body: Mapping[str, Any], name: str) -> list[Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid(f"'{name}' must be an array, got {_type_name(value)}", name)
    return value


def get_object(body: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"'{name}' must be an object, got {_type_name(value)}", name)
    return value


def check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise invalid(f"'{name}' must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise invalid(f"'{name}' must be <= {hi}, got {value}", name)


def token_id_list(value: Any, name: str, vocab_size: int) -> list[int]:
    """A JSON array of token ids, each in [0, vocab_size)."""
    if not isinstance(value, list):
        raise invalid(f"'{name}' must be an array of token ids", name)
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise invalid(f"'{name}' holds {token!r}, not a token id in [0, {vocab_size})", name)
    return list(value)

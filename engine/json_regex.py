"""JSON schemas whose documents are a regular language, written as the regex of their JSON text.

A regex's masks are cached by DFA state (engine/grammar_states.py); a JSON schema's are not (llguidance's JSON
grammar keeps a parser stack). OpenAI's strict structured outputs are mostly regular: objects whose properties are
all required and the only ones allowed, enums, consts, booleans, null, integers, strings under an anchored
pattern. For such a schema `schema_regex` writes the regex of its documents laid out as llguidance's JSON grammar
lays them out here (engine/grammar.py JSON_OPTIONS: `{"a": 1, "b": "x"}`, properties in the schema's order), and
the compiler decodes that regex instead: the same documents, with cacheable masks. Every document of the regex
is valid against the schema; strings carry no escape sequences (a pattern that could need one, say by allowing
`"`, `\\` or a control character, keeps the schema on llguidance's grammar). Any other schema: None.
"""
from __future__ import annotations

import json
from typing import Any

from pie_server.engine.grammar_states import is_cacheable
from pie_server.engine.regex_syntax import CHARS, NEGATED_CLASS, regex_pieces

ANNOTATIONS = frozenset({"title", "description"})  # keywords that do not constrain a document
_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$")
_INTEGER = "(0|-?[1-9][0-9]*)"  # no -0: JSON allows it, but not as an integer written back


class _NotRegular(Exception):
    pass


def schema_regex(schema_json: str) -> str | None:
    """The regex of the schema's documents, or None when the schema is outside the regular subset."""
    try:
        regex = _value(json.loads(schema_json))
    except (_NotRegular, ValueError, TypeError, RecursionError):
        return None
    return regex if is_cacheable(regex) else None


def _value(schema: Any) -> str:
    if not isinstance(schema, dict):
        raise _NotRegular
    if "enum" in schema or "const" in schema:
        return _choices(schema)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "object":
        return _object(schema)
    if kind == "string":
        return _string(schema)
    simple = {"boolean": "(true|false)", "null": "null", "integer": _INTEGER}
    if kind in simple and set(schema) <= ANNOTATIONS | {"type"}:
        return simple[kind]
    raise _NotRegular


def _object(schema: dict[str, Any]) -> str:
    properties = schema.get("properties", {})
    if (set(schema) - ANNOTATIONS - {"type", "properties", "required", "additionalProperties"}
            or schema.get("additionalProperties") is not False or not isinstance(properties, dict)
            or sorted(schema.get("required", [])) != sorted(properties)):
        raise _NotRegular  # optional or extra properties: left to llguidance
    members = [f'{_literal(_json_text(key))}: {_value(value)}' for key, value in properties.items()]
    return "\\{" + ", ".join(members) + "\\}"


def _choices(schema: dict[str, Any]) -> str:
    if set(schema) - ANNOTATIONS - {"enum", "const", "type"}:
        raise _NotRegular
    values = schema["enum"] if "enum" in schema else [schema["const"]]
    if not isinstance(values, list) or not values or "enum" in schema and "const" in schema:
        raise _NotRegular
    if "type" in schema and not all(_type_of(v) == schema["type"] for v in values):
        raise _NotRegular
    return "(" + "|".join(_literal(_json_text(v)) for v in values) + ")"


def _type_of(value: Any) -> str:
    names = {bool: "boolean", int: "integer", str: "string", type(None): "null"}
    return names.get(type(value), "other")


def _json_text(value: Any) -> str:
    """A scalar's JSON text when it needs no escape sequence (printable ASCII strings, ints, booleans, null)."""
    if isinstance(value, str) and not all(" " <= c <= "~" and c not in '"\\' for c in value):
        raise _NotRegular
    if not isinstance(value, (str, bool, int, type(None))):
        raise _NotRegular
    return json.dumps(value)


def _string(schema: dict[str, Any]) -> str:
    pattern = schema.get("pattern")
    if set(schema) - ANNOTATIONS - {"type", "pattern"} or not isinstance(pattern, str):
        raise _NotRegular  # free strings (llguidance's own masks are cheap there), lengths, formats
    if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
        raise _NotRegular  # an unanchored pattern matches anywhere in the string
    inner = pattern[1:-1]
    if not is_cacheable(inner) or not _reads_plain_chars(inner):
        raise _NotRegular
    return f'"({inner})"'


def _reads_plain_chars(pattern: str) -> bool:
    """Whether every character pattern can match is printable ASCII other than `"` and `\\` (none needs an escape
    in JSON). Read from the pattern's text, not its DFA: the decision must not depend on how long a build takes,
    since every process that opens the schema must decode the same grammar. pattern is_cacheable (no shorthand
    classes, no `.`)."""
    for piece in regex_pieces(pattern):
        if piece.kind == NEGATED_CLASS:
            return False  # it holds the quote, the backslash and the control characters
        if piece.kind == CHARS and not (" " <= piece.low <= piece.high <= "~" and not piece.low <= '"' <= piece.high
                                        and not piece.low <= "\\" <= piece.high):
            return False
    return True


def _literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)

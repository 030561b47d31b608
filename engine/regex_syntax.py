"""A regex's text read as pieces: the one reading of regex syntax that the grammar code's checks share.

Only the dialect that Python's `re` (interegular, engine/grammar_states.py) and Rust's `regex` (llguidance) read
alike is lexed: literal characters and escaped punctuation, `\\n \\t \\r \\xHH`, classes of explicit members and
ranges, groups, alternation, `* + ?` and `{m}`, `{m,}`, `{m,n}`. Everything else (shorthand classes, `\\x{..}`,
`(?...)`, nested classes and set operations, `[]...]`, a brace that is not a count, an unclosed class) ends the
pieces with one FOREIGN piece: the callers treat the regex as outside what they handle.
"""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple

CHARS = "chars"  # a literal character, or a class's range low-high (escapes decoded)
OPEN_CLASS, NEGATED_CLASS, CLOSE_CLASS = "open-class", "negated-class", "close-class"
SYNTAX = "syntax"  # outside classes: ( ) | * + ? . ^ $
COUNT = "count"  # {m}, {m,}, {m,n}: low = m, high = n ("" when open)
FOREIGN = "foreign"  # outside the shared dialect: always the last piece

# Escapes with one meaning in both dialects: escaped punctuation and the control characters; \xHH is read apart.
ESCAPED_PUNCTUATION = frozenset('\\"\'.-[](){}|*+?^$/')
_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}
_COUNT = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
_HEX2 = re.compile(r"[0-9a-fA-F]{2}")


class RegexPiece(NamedTuple):
    kind: str
    low: str = ""
    high: str = ""


def regex_pieces(pattern: str) -> Iterator[RegexPiece]:
    """pattern's pieces in order; the last is FOREIGN if pattern leaves the shared dialect."""
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if in_class and char == "]":
            in_class, i = False, i + 1
            yield RegexPiece(CLOSE_CLASS)
            continue
        if in_class and (char == "[" or pattern[i:i + 2] in ("&&", "--", "~~")):
            yield RegexPiece(FOREIGN)  # Rust nests classes and has set operations in them; Python has neither
            return
        if not in_class:
            piece, i = _outside_class(pattern, i)
            if piece is not None:
                yield piece
                if piece.kind == FOREIGN:
                    return
                in_class = piece.kind in (OPEN_CLASS, NEGATED_CLASS)
                continue
        low, i = _char_at(pattern, i)
        high = low
        if low is not None and in_class and pattern[i:i + 1] == "-" and pattern[i + 1:i + 2] not in ("]", "-", ""):
            high, i = _char_at(pattern, i + 1)
        if low is None or high is None:
            yield RegexPiece(FOREIGN)
            return
        yield RegexPiece(CHARS, low, high)
    if in_class:
        yield RegexPiece(FOREIGN)


def _outside_class(pattern: str, i: int) -> tuple[RegexPiece | None, int]:
    """The syntax piece at pattern[i] and the index after it; None when a character is there."""
    char = pattern[i]
    if char == "[":
        negated = pattern[i + 1:i + 2] == "^"
        i += 2 if negated else 1
        if pattern[i:i + 1] == "]":  # `[]...]`: a literal ] in Python, an error in Rust
            return RegexPiece(FOREIGN), i
        return RegexPiece(NEGATED_CLASS if negated else OPEN_CLASS), i
    if char in "{}":
        count = _COUNT.match(pattern, i)
        if count is None:
            return RegexPiece(FOREIGN), i  # a literal brace in Python, mostly an error in Rust
        low, comma, high = count.groups()
        return RegexPiece(COUNT, low, high if comma else low), count.end()
    if char == "(" and pattern[i + 1:i + 2] == "?":
        return RegexPiece(FOREIGN), i  # flags, non-capturing groups, lookaround: dialects differ
    if char in "()|*+?.^$":
        return RegexPiece(SYNTAX, char), i + 1
    return None, i


def _char_at(pattern: str, i: int) -> tuple[str | None, int]:
    """The literal character at pattern[i] (an escape decoded) and the index after it; None: a foreign escape."""
    if pattern[i] != "\\":
        return pattern[i], i + 1
    escaped = pattern[i + 1:i + 2]
    if escaped == "x":
        digits = pattern[i + 2:i + 4]
        return (chr(int(digits, 16)), i + 4) if _HEX2.fullmatch(digits) else (None, i)
    if escaped in _CONTROL_ESCAPES:
        return _CONTROL_ESCAPES[escaped], i + 2
    return (escaped, i + 2) if escaped and escaped in ESCAPED_PUNCTUATION else (None, i)

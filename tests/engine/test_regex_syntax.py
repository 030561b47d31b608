"""engine/regex_syntax.py: the pieces of regexes in the shared dialect, escapes decoded, and FOREIGN as the last
piece of any regex that leaves it."""
from __future__ import annotations

import pytest

from pie_server.engine.regex_syntax import (CHARS, CLOSE_CLASS, COUNT, FOREIGN, NEGATED_CLASS, OPEN_CLASS, SYNTAX,
                                            RegexPiece, regex_pieces)


def test_literals_classes_groups_and_counts() -> None:
    assert list(regex_pieces("(a|b)*[x-z_]{2,5}c{3}d{1,}")) == [
        RegexPiece(SYNTAX, "("), RegexPiece(CHARS, "a", "a"), RegexPiece(SYNTAX, "|"), RegexPiece(CHARS, "b", "b"),
        RegexPiece(SYNTAX, ")"), RegexPiece(SYNTAX, "*"),
        RegexPiece(OPEN_CLASS), RegexPiece(CHARS, "x", "z"), RegexPiece(CHARS, "_", "_"), RegexPiece(CLOSE_CLASS),
        RegexPiece(COUNT, "2", "5"), RegexPiece(CHARS, "c", "c"), RegexPiece(COUNT, "3", "3"),
        RegexPiece(CHARS, "d", "d"), RegexPiece(COUNT, "1", "")]


def test_escapes_are_decoded_in_and_out_of_classes() -> None:
    assert list(regex_pieces(r"\.\x41[^\"\\\x00-\x1f]\n")) == [
        RegexPiece(CHARS, ".", "."), RegexPiece(CHARS, "A", "A"), RegexPiece(NEGATED_CLASS),
        RegexPiece(CHARS, '"', '"'), RegexPiece(CHARS, "\\", "\\"), RegexPiece(CHARS, "\x00", "\x1f"),
        RegexPiece(CLOSE_CLASS), RegexPiece(CHARS, "\n", "\n")]


def test_in_a_class_syntax_characters_and_edge_dashes_are_literal() -> None:
    assert list(regex_pieces("[-.^$(a-]")) == [RegexPiece(OPEN_CLASS)] + [
        RegexPiece(CHARS, c, c) for c in "-.^$(a-"] + [RegexPiece(CLOSE_CLASS)]


@pytest.mark.parametrize("pattern", [
    r"\d", r"\w+", r"\s", r"\x{41}", r"\p{L}", r"\bx", "(?i)a", "(?:a)", "[a[b]]", "[a&&b]", "[a--b]", "[a~~b]",
    "[]a]", "[abc", "a{", "a}", "a{x}", r"[a-\d]",
])
def test_constructs_outside_the_shared_dialect_end_with_foreign(pattern: str) -> None:
    pieces = list(regex_pieces(pattern))
    assert pieces[-1].kind == FOREIGN and all(piece.kind != FOREIGN for piece in pieces[:-1])

"""A GBNF-style EBNF grammar compiled to one regular expression (recursion unrolled to a bounded depth).

The host constrains `generate` by JSON schema or regex (llguidance, a per-step logit mask); it has no case for
a context-free grammar, so this module turns one into a regex the host can enforce. Rule references are
expanded inline; a rule may be nested inside itself up to `max_depth` times, deeper alternatives are dropped, so
the language accepted is the grammar's restricted to that nesting depth (exactly the grammar when it is not
recursive).

Syntax (llama.cpp's GBNF subset):
    rule   ::= NAME "::=" alts            one rule per definition; `#` starts a comment
    alts   ::= seq ("|" seq)*
    seq    ::= item*
    item   ::= atom ("*" | "+" | "?" | "{" m ("," n?)? "}")?
    atom   ::= "literal" | 'literal' | [class] | NAME | "(" alts ")"
Literals take the escapes \\n \\t \\r \\\\ \\" \\'; a [class] is passed to the regex as written (use syntax that
Rust's regex crate and Python's re both read, e.g. [a-z0-9_]).
"""
from __future__ import annotations

import re

META = set("\\.+*?()|[]{}^$")
_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<literal>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<klass>\[(?:[^\]\\]|\\.)+\])
  | (?P<repeat>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<op>[|()*+?])
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
MAX_PATTERN_CHARS = 100_000
NEVER = None  # an expansion that cannot match (a reference deeper than max_depth)


class GrammarError(ValueError):
    """The grammar text is malformed, or names a rule it does not define."""


def compile_grammar(text: str, start: str = "root", max_depth: int = 4) -> str:
    """The regex (Rust and Python syntax) for the grammar's start rule."""
    rules = parse(text)
    if start not in rules:
        raise GrammarError(f"the grammar has no rule {start!r} (name one with --start)")
    pattern = _Expander(rules, max_depth).rule(start, ())
    if pattern is NEVER:
        raise GrammarError(f"rule {start!r} matches nothing within --max-depth {max_depth}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise GrammarError(f"the unrolled grammar is {len(pattern)} characters (at most {MAX_PATTERN_CHARS}): "
                           "lower --max-depth")
    return pattern


def parse(text: str) -> dict[str, tuple]:
    """Rule name -> expression tree: ("lit", s) | ("class", s) | ("ref", name) | ("seq", [..]) |
    ("alt", [..]) | ("rep", expr, min, max or None)."""
    tokens = _tokenize(text)
    rules: dict[str, tuple] = {}
    pos = 0
    while pos < len(tokens):
        if tokens[pos][0] != "name" or pos + 1 >= len(tokens) or tokens[pos + 1][0] != "define":
            raise GrammarError(f"expected 'NAME ::=' at {tokens[pos][1]!r}")
        name = tokens[pos][1]
        end = pos + 2
        while end < len(tokens) and not (tokens[end][0] == "name" and end + 1 < len(tokens)
                                         and tokens[end + 1][0] == "define"):
            end += 1
        expr, used = _alts(tokens[pos + 2:end], 0)
        if used != end - pos - 2:
            raise GrammarError(f"unexpected {tokens[pos + 2 + used][1]!r} in rule {name!r}")
        if name in rules:
            raise GrammarError(f"rule {name!r} is defined twice")
        rules[name] = expr
        pos = end
    _check_references(rules)
    return rules


def escape(text: str) -> str:
    return "".join("\\" + c if c in META else "\\n" if c == "\n" else "\\t" if c == "\t" else c for c in text)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise GrammarError(f"cannot read the grammar at {text[pos:pos + 20]!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def _alts(tokens: list, pos: int) -> tuple[tuple, int]:
    options = []
    while True:
        seq, pos = _seq(tokens, pos)
        options.append(seq)
        if pos < len(tokens) and tokens[pos] == ("op", "|"):
            pos += 1
            continue
        return (options[0] if len(options) == 1 else ("alt", options)), pos


def _seq(tokens: list, pos: int) -> tuple[tuple, int]:
    items = []
    while pos < len(tokens) and tokens[pos] not in (("op", "|"), ("op", ")")):
        atom, pos = _atom(tokens, pos)
        while pos < len(tokens) and (tokens[pos][0] == "repeat" or tokens[pos][1] in ("*", "+", "?")):
            atom = _repeat(atom, tokens[pos][1])
            pos += 1
        items.append(atom)
    return (items[0] if len(items) == 1 else ("seq", items)), pos


def _atom(tokens: list, pos: int) -> tuple[tuple, int]:
    kind, value = tokens[pos]
    if kind == "literal":
        return ("lit", _unquote(value)), pos + 1
    if kind == "klass":
        return ("class", value), pos + 1
    if kind == "name":
        return ("ref", value), pos + 1
    if (kind, value) == ("op", "("):
        inner, pos = _alts(tokens, pos + 1)
        if pos >= len(tokens) or tokens[pos] != ("op", ")"):
            raise GrammarError("a '(' is not closed")
        return inner, pos + 1
    raise GrammarError(f"unexpected {value!r}")


def _repeat(atom: tuple, op: str) -> tuple:
    if op == "*":
        return ("rep", atom, 0, None)
    if op == "+":
        return ("rep", atom, 1, None)
    if op == "?":
        return ("rep", atom, 0, 1)
    low, _, high = op.strip("{}").partition(",")
    maximum = int(low) if "," not in op else (int(high) if high.strip() else None)
    if maximum is not None and maximum < int(low):
        raise GrammarError(f"bad repetition {op}")
    return ("rep", atom, int(low), maximum)


def _unquote(literal: str) -> str:
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            if body[i + 1] not in _ESCAPES:
                raise GrammarError(f"unknown escape \\{body[i + 1]} in {literal}")
            out.append(_ESCAPES[body[i + 1]])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _check_references(rules: dict[str, tuple]) -> None:
    def walk(expr: tuple) -> None:
        if expr[0] == "ref" and expr[1] not in rules:
            raise GrammarError(f"rule {expr[1]!r} is used but not defined")
        for child in expr[1] if expr[0] in ("seq", "alt") else [expr[1]] if expr[0] == "rep" else []:
            walk(child)
    for expr in rules.values():
        walk(expr)


class _Expander:
    """Inlines rule references. A rule may occur inside its own expansion at most max_depth times; a reference
    nested deeper expands to NEVER (its alternative is dropped)."""

    def __init__(self, rules: dict[str, tuple], max_depth: int) -> None:
        self.rules, self.max_depth = rules, max_depth
        self.memo: dict[tuple, str | None] = {}

    def rule(self, name: str, stack: tuple[str, ...]) -> str | None:
        if stack.count(name) > self.max_depth:
            return NEVER
        stack = stack + (name,)
        key = (name, tuple(sorted((r, stack.count(r)) for r in set(stack))))
        if key not in self.memo:
            self.memo[key] = self.expr(self.rules[name], stack)
        return self.memo[key]

    def expr(self, expr: tuple, stack: tuple[str, ...]) -> str | None:
        kind = expr[0]
        if kind == "lit":
            return escape(expr[1])
        if kind == "class":
            return expr[1]
        if kind == "ref":
            return self.rule(expr[1], stack)
        if kind == "seq":
            parts = [self.expr(e, stack) for e in expr[1]]
            return NEVER if any(p is NEVER for p in parts) else "".join(parts)
        if kind == "alt":
            options = [p for p in (self.expr(e, stack) for e in expr[1]) if p is not NEVER]
            return NEVER if not options else "(?:" + "|".join(options) + ")"
        inner, low, high = self.expr(expr[1], stack), expr[2], expr[3]
        if inner is NEVER or inner == "":
            return "" if low == 0 or inner == "" else NEVER  # zero repetitions still match
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
        suffix = suffix or ("{%d,}" % low if high is None else "{%d}" % low if low == high else "{%d,%d}" % (low, high))
        return "(?:" + inner + ")" + suffix

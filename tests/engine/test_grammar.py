"""Grammar constraints (llguidance): masks only allow what the JSON schema / regex accepts, and a grammar
that is complete stops. Driven by a seeded random walk over the allowed tokens (no model needed)."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from pie_server.engine import grammar as grammar_module
from pie_server.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec, json_schema_problem
from pie_server.engine.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "color", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tiny_llama_dir: Path) -> tuple[GrammarCompiler, Tokenizer, list[int]]:
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    eos = sorted(tokenizer.eos_token_ids)
    return GrammarCompiler(tokenizer.token_bytes(), tokenizer.vocab_size, eos, tokenizer.bos_token_id,
                           tokenizer.encode), tokenizer, eos


def allowed_ids(matcher) -> list[int]:  # noqa: ANN001
    """The token ids set in the matcher's packed mask."""
    bits = np.unpackbits(np.frombuffer(matcher.allowed_token_mask(), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits).tolist()


def walk(matcher, tokenizer: Tokenizer, eos: list[int], seed: int, max_steps: int = 200) -> str:  # noqa: ANN001
    rng = random.Random(seed)
    tokens: list[int] = []
    for _ in range(max_steps):
        allowed = allowed_ids(matcher)
        choices = [t for t in allowed if t not in eos] or list(allowed)
        token = rng.choice(choices)
        if token in eos:
            break
        matcher.accept(token)
        tokens.append(token)
        if matcher.stopped:
            break
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_walk_yields_valid_json(compiler, seed: int) -> None:
    grammars, tokenizer, eos = compiler
    text = walk(grammars.json_schema(json.dumps(SCHEMA)), tokenizer, eos, seed)
    value = json.loads(text)
    assert set(value) == {"ok", "color", "size"}
    assert isinstance(value["ok"], bool) and value["color"] in ("red", "green") and 0 <= value["size"] <= 9


def test_regex_walk_matches(compiler) -> None:
    grammars, tokenizer, eos = compiler
    for seed in range(3):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", walk(grammars.regex(r"[0-9]{3}-[a-z]{2}"), tokenizer, eos, seed))


def test_eos_only_when_the_value_may_end(compiler) -> None:
    grammars, tokenizer, eos = compiler
    matcher = grammars.json_schema(json.dumps({"type": "integer"}))
    assert not set(eos) & set(allowed_ids(matcher))  # nothing written yet: cannot end
    for token in tokenizer.encode("42"):
        matcher.accept(token)
    assert set(eos) <= set(allowed_ids(matcher))


def test_bad_schemas_are_reported(compiler) -> None:
    grammars, _, _ = compiler
    assert json_schema_problem(SCHEMA) is None
    assert "nonsense" in json_schema_problem({"type": "nonsense"})
    with pytest.raises(GrammarError):
        grammars.json_schema("{not json")
    with pytest.raises(GrammarError):
        grammars.json_schema(json.dumps({"type": "nonsense"}))


def test_a_repeated_grammar_gives_independent_matchers_and_the_cache_is_bounded(compiler, monkeypatch) -> None:
    grammars, tokenizer, _ = compiler
    first = grammars.regex("[0-9]{2}")
    second = grammars.regex("[0-9]{2}")  # from the cache
    for token in tokenizer.encode("42"):
        first.accept(token)
    assert first.stopped and not second.stopped
    assert set(allowed_ids(second)) == set(allowed_ids(grammars.regex("[0-9]{2}")))
    for _ in range(2):  # a bad grammar is not cached: it fails every time
        with pytest.raises(GrammarError):
            grammars.regex("[0-9")
    monkeypatch.setattr(grammar_module, "MAX_CACHED_GRAMMARS", 3)
    for n in range(5):
        grammars.regex(f"[a-z]{{{n + 1}}}")
    assert len(grammars._pristine) == 3


def test_check_compiles_a_constraint_once_and_a_matcher_reuses_it(compiler, monkeypatch) -> None:
    grammars, tokenizer, eos = compiler
    compiled = []
    real_compile = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda text: compiled.append(text) or real_compile(text))
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}}, "required": ["n"],
                         "additionalProperties": False})
    spec = GrammarSpec("json-schema", schema)
    grammars.check(spec)
    grammars.check(spec)
    matcher = grammars.matcher(spec)  # from the cache: no parsing, no compiling
    assert len(compiled) == 1
    assert isinstance(json.loads(walk(matcher, tokenizer, eos, seed=1))["n"], int)
    for bad in (GrammarSpec("json-schema", "{not json"), GrammarSpec("regex", "[0-9")):
        with pytest.raises(GrammarError):
            grammars.check(bad)
    assert len(compiled) == 2  # the bad regex got as far as compiling; the bad JSON did not


@pytest.mark.parametrize("num_matchers", [3, grammar_module.MIN_POOLED_MASKS + 4])
def test_fill_masks_equals_each_matchers_own_mask_or_error(compiler, num_matchers: int) -> None:
    grammars, tokenizer, eos = compiler
    matchers = []
    for i in range(num_matchers):  # matchers at different states of different grammars
        matcher = grammars.json_schema(json.dumps(SCHEMA)) if i % 2 else grammars.regex(r"[0-9]{3}-[a-z]{2}")
        for token in tokenizer.encode('{"ok": true, "color": "red"' if i % 2 else "123-a")[:i % 5]:
            matcher.accept(token)
        matchers.append(matcher)
    broken = grammars.regex("[0-9]+")
    with pytest.raises(GrammarError):
        broken.accept(tokenizer.encode("x")[0])
    matchers.insert(1, broken)
    masks = grammar_module.fill_masks(matchers)
    assert isinstance(masks[1], GrammarError) and "grammar error" in str(masks[1])
    expected = [m.allowed_token_mask() for i, m in enumerate(matchers) if i != 1]
    assert [m for i, m in enumerate(masks) if i != 1] == expected
    assert len(set(expected)) >= 2  # the matchers were in different states


def test_forced_text_is_tokenized_once_per_string(tiny_llama_dir: Path) -> None:
    """llguidance tokenizes the text a grammar forces (the rest of a tool name) through the compiler's encoder; a
    string it saw before is not encoded again, and the masks stay those of the uncached encoder."""
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    eos = sorted(tokenizer.eos_token_ids)
    encoded: list[str] = []

    def encode(text: str) -> list[int]:
        encoded.append(text)
        return tokenizer.encode(text)

    grammars = GrammarCompiler(tokenizer.token_bytes(), tokenizer.vocab_size, eos, tokenizer.bos_token_id, encode)
    reference = GrammarCompiler(tokenizer.token_bytes(), tokenizer.vocab_size, eos, tokenizer.bos_token_id,
                                tokenizer.encode)
    for seed in range(6):
        cached, plain = grammars.regex("(search|calculate)"), reference.regex("(search|calculate)")
        rng = random.Random(seed)
        while not cached.stopped:
            allowed = allowed_ids(cached)
            assert allowed == allowed_ids(plain)
            token = rng.choice([t for t in allowed if t not in eos])
            cached.accept(token)
            plain.accept(token)
    assert encoded, "the grammar forced no text: the test exercises nothing"
    assert len(encoded) == len(set(encoded))

"""Regular JSON schemas decoded as regexes (engine/json_regex.py): the documents are valid against the schema and
are documents of llguidance's own JSON grammar for it, laid out the same; the masks are cached; other schemas
stay on llguidance's grammar."""
from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

from pie_server.engine.grammar import GrammarCompiler, GrammarSpec, _grammar_of
from pie_server.engine.json_regex import schema_regex
from pie_server.engine.tokenizer import Tokenizer

from tests.engine.test_grammar import allowed_ids

ACTION = {"type": "object", "properties": {"tool": {"enum": ["search", "calculate", "finish"]},
                                           "input": {"type": "string", "pattern": "^[a-z ]{4}$"}},
          "required": ["tool", "input"], "additionalProperties": False}
INNER = {"type": "object", "properties": {"none": {"type": "null"},
                                         "code": {"type": "string", "pattern": "^[A-Z]{2}$"}},
         "required": ["code", "none"], "additionalProperties": False}
NESTED = {"type": "object", "title": "record", "additionalProperties": False, "required": ["ok", "n", "kind", "inner"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}, "kind": {"const": "a.b"}, "inner": INNER}}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama_dir)


@pytest.fixture()
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.token_bytes(), tokenizer.vocab_size, sorted(tokenizer.eos_token_ids),
                           tokenizer.bos_token_id, tokenizer.encode)


def walk(matcher, eos: set[int], rng: random.Random) -> list[int]:  # noqa: ANN001
    token_ids: list[int] = []
    while not matcher.stopped and len(token_ids) < 80:
        choices = [t for t in allowed_ids(matcher) if t not in eos]
        if not choices:
            break
        token_ids.append(rng.choice(choices))
        matcher.accept(token_ids[-1])
    return token_ids


@pytest.mark.parametrize("schema", [ACTION, NESTED], ids=["action", "nested"])
def test_documents_are_valid_and_llguidance_json_grammar_accepts_them(compiler: GrammarCompiler,
                                                                      tokenizer: Tokenizer, schema: dict) -> None:
    text = json.dumps(schema)
    regex = schema_regex(text)
    assert regex is not None and compiler._masks.build(regex).result(timeout=30) is not None  # its DFA, built
    json_grammar = compiler._compile(_grammar_of(GrammarSpec("json-schema", text)))  # llguidance's own, unconverted
    rng = random.Random(0)
    for _ in range(6):
        matcher = compiler.json_schema(text)
        assert matcher.cache_key is not None  # decoded as the regex
        token_ids = walk(matcher, set(tokenizer.eos_token_ids), rng)
        document = tokenizer.decode(token_ids)
        jsonschema.validate(json.loads(document), schema)
        assert document == json.dumps(json.loads(document))  # the compact layout: ", " and ": "
        own = json_grammar.deep_copy()
        assert own.consume_tokens(token_ids) is not False and not own.is_error()
        assert own.is_accepting()


def test_the_agents_action_masks_are_cached(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    compiler._masks.build(schema_regex(json.dumps(ACTION))).result(timeout=30)
    first, second = compiler.json_schema(json.dumps(ACTION)), compiler.json_schema(json.dumps(ACTION))
    first.accept_all(tokenizer.encode('{"tool": "search", "input": "ab'))
    second.accept_all(tokenizer.encode('{"tool": "finish", "input": "xy'))
    assert first.allowed_token_mask() == second.allowed_token_mask()
    assert second.cached_mask() is not None


@pytest.mark.parametrize("schema", [
    {"type": "string"},                                                   # free strings: escapes, any length
    {"type": "string", "pattern": "[a-z]{3}"},                            # unanchored: matches anywhere
    {"type": "string", "pattern": "^[^x]{3}$"},                           # may need escapes (", \\, controls)
    {"type": "string", "pattern": "^[ -~]{3}$"},                          # the range holds " and \\
    {"type": "string", "pattern": '^[a-z\\"]{3}$'},                        # an escaped quote
    {"type": "string", "pattern": "^[a-z\\x01]{3}$"},                      # a control character
    {"type": "string", "pattern": "^caf\u00e9$"},                          # not ASCII
    {"type": "string", "pattern": "^[a-z]{3}$", "maxLength": 2},
    {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},  # extra properties allowed
    {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": [], "additionalProperties": False},
    {"type": "integer", "minimum": 0},
    {"type": "number"},
    {"type": "array", "items": {"type": "boolean"}},
    {"enum": [1.5]},
    {"enum": ["a\"b"]},
    {"enum": ["é"]},
    {"enum": []},
    {"type": "string", "enum": [1]},
])
def test_schemas_outside_the_regular_subset_stay_json(schema: dict) -> None:
    assert schema_regex(json.dumps(schema)) is None


@pytest.mark.parametrize("pattern", ["^[A-Z][a-z0-9_-]{1,8}$", "^(yes|no)$", r"^[a-f\.\-]{2}( [0-9]+)?$"])
def test_plain_patterns_become_regexes(pattern: str) -> None:
    assert schema_regex(json.dumps({"type": "string", "pattern": pattern})) == f'"({pattern[1:-1]})"'


def test_other_schemas_keep_llguidance_json_grammar(compiler: GrammarCompiler) -> None:
    matcher = compiler.json_schema(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}))
    assert matcher.cache_key is None

"""constrained-decoding (inferlets/contrib/constrained-decoding) on SmolLM2-135M: whatever the model would rather
write, the output parses: JSON values validated against their schemas (jsonschema), regex and EBNF outputs
matched in full (re), checked here on the text the client received; bad grammars fail with a clear message.
The EBNF-to-regex compiler (ebnf.py, plain Python) is unit-tested directly."""
from __future__ import annotations

import importlib.util
import json
import re
from types import ModuleType

import jsonschema
import pytest

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Message, Terminated, Text
from pie_server.inferlets import CONTRIB_DIR
from tests.inferlets.contrib.conftest import TIMEOUT_S, Builder, assert_pages_free, events

pytestmark = pytest.mark.timeout(600)
INFERLETS = ("constrained-decoding",)  # built in the background (conftest.py)

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "Tokyo", "Lima"]}}}
SHOPPING = {"type": "array", "minItems": 2, "maxItems": 3,
            "items": {"type": "object", "additionalProperties": False, "required": ["item", "quantity"],
                      "properties": {"item": {"type": "string", "maxLength": 12},
                                     "quantity": {"type": "integer", "minimum": 1, "maximum": 9}}}}
VERDICT = {"type": "object", "additionalProperties": False, "required": ["answer", "confident"],
           "properties": {"answer": {"type": "boolean"}, "confident": {"type": "boolean"}}}
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
ARITHMETIC = """
root   ::= expr
expr   ::= term (("+" | "-") term){0,3}     # at most four terms per level
term   ::= factor ("*" factor)?
factor ::= [1-9] [0-9]? | "(" expr ")"
"""
CASES = {
    "person": (["--prompt", "Describe a fictional person.", "--json-schema", json.dumps(PERSON)], PERSON),
    "shopping": (["--prompt", "Write a short shopping list.", "--json-schema", json.dumps(SHOPPING)], SHOPPING),
    "verdict": (["--prompt", "Is the sky green?", "--json-schema", json.dumps(VERDICT)], VERDICT),
    "phone": (["--prompt", "Give me a US phone number.", "--regex", PHONE], PHONE),
    "date": (["--prompt", "When did the Berlin wall fall?", "--regex", DATE], DATE),
    "arithmetic": (["--prompt", "Write an arithmetic expression that equals 12.", "--ebnf", ARITHMETIC,
                    "--max-depth", "1"], None),  # matched against the grammar's own reading, below
}


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build("constrained-decoding", real_engine)


@pytest.fixture(scope="module")
def ebnf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("contrib_ebnf", CONTRIB_DIR / "constrained-decoding" / "ebnf.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _run_all(engine: Engine, program: str, runs: dict[str, list[str]]) -> dict[str, list[Message]]:
    """Launches every run at once (their steps share the engine's batches), then collects each."""
    handles = {name: engine.runtime.launch(program, args) for name, args in runs.items()}
    return {name: handle.messages(TIMEOUT_S) for name, handle in handles.items()}


def test_every_output_parses(real_engine: Engine, program: str, ebnf: ModuleType) -> None:
    results = _run_all(real_engine, program, {name: [*args, "--max-tokens", "96"]
                                               for name, (args, _) in CASES.items()})
    for name, messages in results.items():
        end = messages[-1]
        assert isinstance(end, Terminated) and end.ok, (name, end)
        [report] = events(messages)
        text = "".join(m.text for m in messages if isinstance(m, Text) and m.channel == 0)
        assert text == report["text"] and report["finish_reason"] == "stop" and report["valid"], (name, report)
        spec = CASES[name][1]
        if isinstance(spec, dict):
            value = json.loads(text)
            jsonschema.validate(value, spec)
            assert report["value"] == value
        elif isinstance(spec, str):
            assert re.fullmatch(spec, text), (name, text)
        else:
            assert re.fullmatch(ebnf.compile_grammar(ARITHMETIC, max_depth=1), text), text
    assert_pages_free(real_engine)


def test_bad_constraints_fail_clearly(real_engine: Engine, program: str) -> None:
    results = _run_all(real_engine, program, {
        "undefined rule": ["--prompt", "x", "--ebnf", 'root ::= "a" missing'],
        "not json": ["--prompt", "x", "--json-schema", "{not json"],
        "two grammars": ["--prompt", "x", "--regex", "a", "--ebnf", 'root ::= "a"']})
    errors = {name: messages[-1].error or "" for name, messages in results.items()
              if isinstance(messages[-1], Terminated) and not messages[-1].ok}
    assert "rule 'missing' is used but not defined" in errors["undefined rule"]
    assert "--json-schema is not JSON" in errors["not json"]
    assert "not allowed with argument" in errors["two grammars"]
    assert_pages_free(real_engine)


def test_ebnf_compiles_to_an_equivalent_regex(ebnf: ModuleType) -> None:
    pattern = ebnf.compile_grammar(ARITHMETIC, max_depth=2)
    for text in ("7", "1+2*3", "(4-5)*67", "((1+2))", "1+2+3+4"):
        assert re.fullmatch(pattern, text), text
    for text in ("", "0", "1+", "(1", "1+2+3+4+5", "(((1)))", "123"):
        assert not re.fullmatch(pattern, text), text  # ((( nests expr in itself 3 times: deeper than 2
    literal = ebnf.compile_grammar("root ::= 'a.b' | \"(x)\\n\" | [0-9]+ '?'")
    assert [bool(re.fullmatch(literal, t)) for t in ("a.b", "axb", "(x)\n", "42?", "?")] == [
        True, False, True, True, False]


def test_ebnf_errors(ebnf: ModuleType) -> None:
    for grammar, message in (("root ::= (\"a\"", "not closed"), ("root = 'a'", "cannot read"),
                             ("start ::= 'a'", "no rule 'root'"), ("root ::= 'a'\nroot ::= 'b'", "defined twice"),
                             ("root ::= root 'a'", "matches nothing")):
        with pytest.raises(ebnf.GrammarError, match=message):
            ebnf.compile_grammar(grammar)

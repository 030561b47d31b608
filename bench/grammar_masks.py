"""Grammar masks of one step, one by one against llguidance's thread pool (engine/grammar.py fill_masks), on this
host: where MIN_POOLED_MASKS should be.

N matchers of the agentic benchmark's action schema (bench/agentic.py: `{"tool": ..., "input": "[a-z ]{16}"}`)
are advanced to one position, then their next masks are computed each way; medians of `--repeats`. Two
positions: inside the input value (a mask walks every lowercase token: the expensive case) and right after the
first key (a few tokens allowed: the cheap case). The schema is regular (engine/json_regex.py), so the server
decodes it as a regex whose masks are cached by DFA state (engine/grammar_states.py): after the first repeat the
one-by-one (each matcher's allowed_token_mask) and fill_masks columns are cache hits, and the pool column
(llguidance's pool, which never reads the cache) is llguidance's own cost. Then the react-agent's way, the value
alone under its regex `[a-z ]{16}`.

    python -m bench.grammar_masks --model DIR [--counts 1 2 4 8 16 32 128] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.imports import without_repo_root
from pie_server.engine import grammar
from pie_server.engine.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"tool": {"enum": ["search", "calculate", "finish"]},
                                           "input": {"type": "string", "pattern": "^[a-z ]{16}$"}},
          "required": ["tool", "input"], "additionalProperties": False}
ACTION = '{"tool": "search", "input": "abc defgh ijklmn"}'
POSITIONS = {"inside the value": ACTION.index("abc") + 3, "after the first key": len('{"tool":')}
# The react-agent decodes the same value under a regex instead: its masks are cached by DFA state
# (engine/grammar_states.py), so after the first repeat every mask is a lookup.
VALUE_REGEX, VALUE = "[a-z ]{16}", "abc defgh ijklmn"


def _matchers(compiler: grammar.GrammarCompiler, prefix_ids: list[int], count: int,
              spec: grammar.GrammarSpec) -> list[grammar.GrammarMatcher]:
    matchers = [compiler.matcher(spec) for _ in range(count)]
    for matcher in matchers:
        matcher.accept_all(prefix_ids)
    return matchers


# How a step's masks are computed: llguidance one by one, llguidance's pool, or fill_masks (what the server
# calls: a regex's cached masks first, the rest one by one or pooled by MIN_POOLED_MASKS).
WAYS = {"one by one": grammar.fill_masks_one_by_one, "pool": grammar.fill_masks_pooled,
        "fill_masks": grammar.fill_masks}


def _time_ms(compiler: grammar.GrammarCompiler, prefix_ids: list[int], count: int, way: str,
             repeats: int, spec: grammar.GrammarSpec) -> float:
    times = []
    for _ in range(repeats):
        matchers = _matchers(compiler, prefix_ids, count, spec)
        start = time.perf_counter()
        WAYS[way](matchers)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (its tokenizer)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with without_repo_root():
        tokenizer = Tokenizer.from_dir(args.model)
    compiler = grammar.GrammarCompiler.for_tokenizer(tokenizer, tokenizer.vocab_size)
    print(f"{os.cpu_count()} CPUs; MIN_POOLED_MASKS = {grammar.MIN_POOLED_MASKS}")
    print("| position | matchers | " + " | ".join(f"{way} ms" for way in WAYS) + " |\n|---|---|---|---|---|")
    schema = grammar.GrammarSpec("json-schema", json.dumps(SCHEMA))
    cases = [(label, schema, ACTION, num_chars) for label, num_chars in POSITIONS.items()]
    cases.append(("regex value, cached by DFA state", grammar.GrammarSpec("regex", VALUE_REGEX), VALUE, 3))
    for label, spec, text, num_chars in cases:
        ids = tokenizer.encode(text)
        prefix = next(ids[:k] for k in range(len(ids) + 1) if len(tokenizer.decode(ids[:k])) >= num_chars)
        for count in args.counts:
            times = [_time_ms(compiler, prefix, count, way, args.repeats, spec) for way in WAYS]
            print(f"| {label} | {count} | " + " | ".join(f"{ms:.3f}" for ms in times) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Grammar masks of one step, one by one against llguidance's thread pool (engine/grammar.py fill_masks), on this
host: where MIN_POOLED_MASKS should be.

N matchers of the agentic benchmark's action schema (bench/agentic.py: `{"tool": ..., "input": "[a-z ]{16}"}`)
are advanced to one position, then their next masks are computed both ways; medians of `--repeats`. Two
positions: inside the input value (a mask walks every lowercase token: the expensive case) and right after the
first key (a few tokens allowed: the cheap case).

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


def _matchers(compiler: grammar.GrammarCompiler, prefix_ids: list[int], count: int) -> list[grammar.GrammarMatcher]:
    matchers = [compiler.json_schema(json.dumps(SCHEMA)) for _ in range(count)]
    for matcher in matchers:
        matcher.accept_all(prefix_ids)
    return matchers


def _time_ms(compiler: grammar.GrammarCompiler, prefix_ids: list[int], count: int, pooled: bool,
             repeats: int) -> float:
    times = []
    for _ in range(repeats):
        matchers = _matchers(compiler, prefix_ids, count)
        start = time.perf_counter()
        if pooled:
            grammar.fill_masks_pooled(matchers)
        else:
            grammar.fill_masks_one_by_one(matchers)
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
    print("| position | matchers | one by one ms | pool ms |\n|---|---|---|---|")
    ids = tokenizer.encode(ACTION)
    for label, num_chars in POSITIONS.items():
        prefix = next(ids[:k] for k in range(len(ids) + 1) if len(tokenizer.decode(ids[:k])) >= num_chars)
        for count in args.counts:
            serial = _time_ms(compiler, prefix, count, False, args.repeats)
            pooled = _time_ms(compiler, prefix, count, True, args.repeats)
            print(f"| {label} | {count} | {serial:.3f} | {pooled:.3f} |", flush=True)


if __name__ == "__main__":
    main()

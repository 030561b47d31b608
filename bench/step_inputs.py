"""Host microseconds of a decode step's input building in the executor (engine/executor/step_inputs.py and the
attention's host metadata, kernels/flashinfer_attention.py), the decode way against the general way, in one
process. Pure numpy: runs anywhere (the GPU host's numbers differ in scale, not in kind).

    .venv/bin/python -m bench.step_inputs [--batches 16 64 256] [--pages 8] [--repeats 7] [--json PATH]

Each row: the median over repeats of the mean time per call (1,000 calls) of build_step_inputs on B decode
commands of --pages pages each over a cycle of steady decode steps (page tuples passed on from step to step, one
row in 16 taking a new tuple each step), converted every step, then as the executor runs them with its PageArrays
(kept from KEEP_MIN_PAGES pages per command on; the general way: one step's commands again and again), then of
build_host_metadata on its attention step (with the builder's source rows, and as before without them: np.unique
over the slots).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import timeit
from typing import Callable

import msgspec

from pie_server.engine.executor import step_inputs
from pie_server.engine.step import ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.kernels.flashinfer_attention import build_host_metadata

PAGE_SIZE, CALLS = 16, 1000


class Model:
    vocab_size = 49152
    max_position_embeddings = 8192


def decode_commands(num_seqs: int, num_pages: int) -> list[ForwardCommand]:
    return [ForwardCommand([5], [(num_pages - 1) * PAGE_SIZE + 6], list(range(b * num_pages, (b + 1) * num_pages)),
                           7, (OutputSpec(0, SamplingParams()),), None, TokenRef(1, b)) for b in range(num_seqs)]


def steady_steps(num_seqs: int, num_pages: int, num_steps: int = 160) -> list[list[ForwardCommand]]:
    """Decode steps as the control layer hands them on: each row's page tuple is passed on from step to step and
    replaced by a new one once every PAGE_SIZE steps (a decode opening its next page), the rows staggered."""
    versions: dict[tuple[int, int], tuple[int, ...]] = {}
    steps = []
    for step in range(num_steps):
        commands = []
        for b, c in enumerate(decode_commands(num_seqs, num_pages)):
            key = (b, (step + b) // PAGE_SIZE)
            pages = versions.setdefault(key, tuple(c.page_ids))
            commands.append(msgspec.structs.replace(c, page_ids=pages))
        steps.append(commands)
    return steps


def _us(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(timeit.repeat(fn, number=CALLS, repeat=repeats)) / CALLS * 1e6


def measure(num_seqs: int, num_pages: int, repeats: int) -> dict[str, float | int]:
    commands = decode_commands(num_seqs, num_pages)
    total_pages = num_seqs * num_pages + 8
    args = (commands, Model, PAGE_SIZE, total_pages)
    step = step_inputs.build_step_inputs(*args).attention
    steady, arrays = itertools.cycle(steady_steps(num_seqs, num_pages)), step_inputs.PageArrays()
    return {
        "batch": num_seqs,
        "inputs_decode_us": _us(lambda: step_inputs.build_step_inputs(next(steady), Model, PAGE_SIZE, total_pages),
                                repeats),
        "inputs_kept_pages_us": _us(lambda: step_inputs.build_step_inputs(next(steady), Model, PAGE_SIZE, total_pages,
                                                                          arrays), repeats),
        "inputs_general_us": _us(lambda: step_inputs._any_step_inputs(*args), repeats),
        "metadata_given_rows_us": _us(lambda: build_host_metadata(step), repeats),
        "metadata_unique_us": _us(lambda: build_host_metadata(dataclasses.replace(step, source_rows=None)), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--pages", type=int, default=8, help="pages per sequence")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [measure(b, args.pages, args.repeats) for b in args.batches]
    print("| batch | inputs: decode way us | decode way, kept page tuples us | general way us | "
          "host metadata: given rows us | np.unique us |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['inputs_decode_us']:.1f} | {r['inputs_kept_pages_us']:.1f} | "
              f"{r['inputs_general_us']:.1f} | "
              f"{r['metadata_given_rows_us']:.1f} | {r['metadata_unique_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "step_inputs", "pages_per_sequence": args.pages, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""The decoder's matmuls on CPU: F.linear against kernels.ops.linear (the default ways of kernels/cpu_linear.py: weight
@ x.T up to 4 rows, oneDNN beyond) and against the ways measured on this machine (CpuLinear.measured, what the
executor runs) over the default model's float32 weights, next to the memory-bandwidth floor (one multi-threaded pass
over the same bytes).

    .venv/bin/python -m bench.cpu_matmul [--model PATH] [--rows 1 2 4 8 16 32] [--repeats 9] [--json PATH]

One "pass" = every layer's qkv, o, gate_up and down projection and the LM head, once, on `rows` rows: what a decode
step of `rows` sequences multiplies. Weights are far larger than the caches, so each pass streams them from memory.
Medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.imports import without_repo_root
from bench.timing import median_ms
from pie_server.engine.model.llama import LlamaModel
from pie_server.engine.model.loader import cache_root, load_model_config, load_weights, resolve_model_dir
from pie_server.kernels import ops
from pie_server.kernels.cpu_linear import RECORD_NAME, ROUTE_ROWS, CpuLinear

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _one_pass(weights: list[torch.Tensor], linear: Linear, num_rows: int) -> Callable[[], None]:
    inputs = {k: torch.randn(num_rows, k) for k in {w.shape[1] for w in weights}}

    def run() -> None:
        for w in weights:
            linear(inputs[w.shape[1]], w)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    config = load_model_config(model_dir)
    model = LlamaModel(config, load_weights(model_dir, torch.float32, "cpu", progress=False), torch.device("cpu"),
                       torch.float32)
    weights = model.matmul_weights()
    num_bytes = sum(w.numel() * w.element_size() for w in weights)
    stream = torch.cat([w.reshape(-1) for w in weights])
    floor_ms = median_ms(stream.sum, args.repeats)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; {model_dir.name} float32, {num_bytes / 1e6:.0f} MB of weights per pass; "
          f"floor (one read of them) {floor_ms:.1f} ms = {num_bytes / floor_ms / 1e6:.1f} GB/s; "
          f"median of {args.repeats}")
    measured = CpuLinear.measured(weights, record=cache_root() / RECORD_NAME)  # the executor's choice
    print(f"measured ways for {ROUTE_ROWS} rows: {measured.ways}")
    print(f"{'rows':>5}{'F.linear ms':>13}{'ops.linear ms':>15}{'measured ms':>13}{'speedup':>9}{'x floor':>9}")
    rows = []
    for num_rows in args.rows:
        base = median_ms(_one_pass(weights, F.linear, num_rows), args.repeats)
        default = median_ms(_one_pass(weights, ops.linear, num_rows), args.repeats)
        ours = median_ms(_one_pass(weights, measured, num_rows), args.repeats)
        rows.append({"rows": num_rows, "f_linear_ms": base, "ops_linear_ms": default, "measured_ms": ours,
                     "measured_way": measured.way(num_rows)})
        print(f"{num_rows:>5}{base:>13.1f}{default:>15.1f}{ours:>13.1f}{base / ours:>9.2f}{ours / floor_ms:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "processor": platform.processor()},
            "command": " ".join(sys.argv), "model": model_dir.name, "weight_bytes": num_bytes,
            "floor_ms": floor_ms, "rows": rows,
        }, indent=2) + "\n")


if __name__ == "__main__":
    with without_repo_root():  # transformers imports the PyPI package `kernels`, which kernels/ would hide
        main()

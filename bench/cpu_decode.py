"""CPU decode throughput on the default model: single stream and 16 sequences decoded together through the
executor, next to Hugging Face `generate` one sequence at a time, same process, same weights, same threads.

    .venv/bin/python -m bench.cpu_decode [--model PATH] [--new-tokens 64] [--repeats 3] [--json bench/results/cpu_decode.json]

Decode tokens/s = generated tokens / wall time of the whole generate call (prefill of a short prompt included,
identically for both). Medians over repeats.
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

from bench.imports import without_repo_root
from bench.timing import median_rate
from pie_server.engine.config import EngineConfig
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.loader import load_model_config, load_weights, resolve_model_dir
from pie_server.engine.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    config = load_model_config(model_dir)
    executor = Executor(config, EngineConfig(num_pages=4096, dtype="float32"),
                        load_weights(model_dir, torch.float32, "cpu", progress=False))
    gen = DirectGenerator(executor)
    n = args.new_tokens

    def ours(batch: int) -> Callable[[], int]:
        return lambda: sum(len(o) for o in gen.generate([prompt_ids] * batch, n))

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_input = torch.tensor([prompt_ids])

    def hf_generate() -> int:
        with torch.inference_mode():
            out = hf.generate(hf_input, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=tokenizer.eos_token_ids and min(tokenizer.eos_token_ids))
        return out.shape[1] - hf_input.shape[1]

    rows = {
        "hf_generate_1": median_rate(hf_generate, args.repeats),
        "pie_executor_1": median_rate(ours(1), args.repeats),
        f"pie_executor_{args.batch}": median_rate(ours(args.batch), args.repeats),
    }
    base = rows["hf_generate_1"]
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}; model {config.model_type} {model_dir.name}; "
          f"prompt {len(prompt_ids)} tokens, {n} new tokens, median of {args.repeats}")
    print(f"{'run':<22}{'tok/s':>10}{'x HF generate':>16}")
    for name, tps in rows.items():
        print(f"{name:<22}{tps:>10.1f}{tps / base:>16.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform()},
            "command": " ".join(sys.argv), "prompt_tokens": len(prompt_ids), "new_tokens": n,
            "tokens_per_s": rows, "ratio_vs_hf_generate": {k: v / base for k, v in rows.items()},
        }, indent=2) + "\n")


if __name__ == "__main__":
    with without_repo_root():  # transformers imports the PyPI package `kernels`, which kernels/ would hide
        main()

"""Write random bf16 weights of a model folder's shape as its model.safetensors (for GPU speed runs: weights of
real shapes cannot be carried to the GPU machine, and speed does not depend on their values).

    python3 bench/make_random_model.py .gpu-model [--device cuda] [--seed 0]

The folder must hold config.json (and, to be served, the tokenizer files). Norms are 1, every other weight
N(0, 0.02), as engine.model.llama.random_weights makes them; the text such a model writes is garbage, so load
generators must use ignore_eos. When the folder's tokenizer.json knows fewer tokens than the config's vocabulary
(a SmolLM2 tokenizer beside a Llama-3.1-8B shape), the output-projection rows of the unknown ids are zero: their
logit is 0, far below the largest random one, so greedy decoding only picks ids the tokenizer can print (the
weights keep their real shape, so the bytes read per step do not change). An existing model.safetensors is
replaced.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pie_server.engine.model.llama import random_weights
from pie_server.engine.model.loader import load_model_config

WEIGHTS_FILE = "model.safetensors"


def write_random_model(model_dir: Path, device: str = "cpu", seed: int = 0) -> Path:
    """Writes model_dir/model.safetensors (bf16, contiguous, on the host) and returns its path."""
    cfg = load_model_config(model_dir)
    weights = random_weights(cfg, torch.device(device), torch.bfloat16, seed)
    num_known = _tokenizer_vocab_size(model_dir)
    if num_known is not None and num_known < cfg.vocab_size:
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        weights[head][num_known:] = 0
    on_host = {name: tensor.contiguous().cpu() for name, tensor in weights.items()}
    out = model_dir / WEIGHTS_FILE
    partial = model_dir / f".{WEIGHTS_FILE}.partial"
    save_file(on_host, str(partial), metadata={"format": "pt"})
    partial.replace(out)  # never leaves a half-written model.safetensors behind
    return out


def _tokenizer_vocab_size(model_dir: Path) -> int | None:
    """Ids the folder's tokenizer.json can decode (None without one)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="a folder with config.json")
    parser.add_argument("--device", default="cpu", help="where to draw the numbers (cuda is faster for 8B shapes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir} has no config.json")
    started = time.perf_counter()
    out = write_random_model(args.model_dir, args.device, args.seed)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

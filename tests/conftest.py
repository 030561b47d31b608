"""Shared fixtures: a model cache isolated per test session, the default model converted once per session,
and a tiny random Llama in a Hugging Face directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

# The tiny model's shape: small enough to build in well under a second, with GQA (2 query heads per kv head).
TINY_LLAMA_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                        rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="session", autouse=True)
def pie_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$PIE_CACHE_DIR for the whole session: tests (and servers they start) never touch ~/.cache/pie, and
    share the one conversion of the default model."""
    cache_dir = tmp_path_factory.mktemp("pie-cache")
    previous = os.environ.get("PIE_CACHE_DIR")
    os.environ["PIE_CACHE_DIR"] = str(cache_dir)
    yield cache_dir
    if previous is None:
        os.environ.pop("PIE_CACHE_DIR", None)
    else:
        os.environ["PIE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def default_model_dir(pie_cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32 weights), converted from its GGUF once
    per session (~20-30 s on 2 CPU cores)."""
    from pie_server.engine.model.loader import resolve_model_dir

    return resolve_model_dir(None, cache_dir=pie_cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM (seed 0, float32, untied embeddings, shape TINY_LLAMA_SHAPE) saved with
    save_pretrained, plus the default model's tokenizer and chat template (vocab 49152)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pie_server.engine.model.default_model import locate_default_model

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    gguf_path = locate_default_model()
    # Only the tokenizer is read from the GGUF (a few seconds), not its weights.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TINY_LLAMA_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return model_dir

"""The embedded default model (SmolLM2-135M-Instruct, dequantized from its GGUF) against transformers on the
same weights: prompt logits and greedy continuations of a real chat prompt."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pie_server.engine.config import EngineConfig
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.loader import load_model_config, load_weights
from pie_server.engine.tokenizer import Tokenizer

GREEDY = SamplingParams()
NUM_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def loaded(default_model_dir: Path) -> tuple[Executor, torch.nn.Module, Tokenizer]:
    from transformers import AutoModelForCausalLM

    executor = Executor(load_model_config(default_model_dir), EngineConfig(num_pages=256, dtype="float32"),
                        load_weights(default_model_dir, torch.float32, progress=False))
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return executor, hf, Tokenizer.from_dir(default_model_dir)


def _chat(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def test_prompt_logits_match_transformers(loaded: tuple[Executor, torch.nn.Module, Tokenizer]) -> None:
    executor, hf, tokenizer = loaded
    prompt = _chat(tokenizer, "What is the capital of France?")
    num_pages = -(-len(prompt) // 16)
    command = ForwardCommand(token_ids=prompt, positions=list(range(len(prompt))),
                             page_ids=list(range(100, 100 + num_pages))[::-1],
                             last_page_len=len(prompt) - (num_pages - 1) * 16,
                             outputs=[OutputSpec(index=i, sampling=GREEDY) for i in range(len(prompt))])
    logits = executor.logits(Batch(forwards=[command]))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=1e-3)


def test_greedy_continuations_match_transformers(loaded: tuple[Executor, torch.nn.Module, Tokenizer]) -> None:
    executor, hf, tokenizer = loaded
    prompts = [_chat(tokenizer, t) for t in ("What is the capital of France?", "Count to five.")]
    outputs = DirectGenerator(executor, scatter_pages=True).generate(prompts, NUM_NEW_TOKENS)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():  # HF stops after an eos token; ours runs on, so compare HF's length
            expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NUM_NEW_TOKENS,
                                   pad_token_id=0)[0, len(prompt):].tolist()
        assert len(expected) >= 4
        assert output[:len(expected)] == expected
    assert "Paris" in tokenizer.decode(outputs[0])

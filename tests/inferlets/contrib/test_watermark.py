"""watermark (inferlets/contrib/watermark) on the default model (SmolLM2-135M): every generated token is the
argmax of logprob + delta * green over the WHOLE vocabulary (checked here with transformers over the same
weights, also when a narrow top-k makes the inferlet rewind and ask again), and its detector finds the
watermark in its own text (greedy or sampled) but not in the model's plain greedy text."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from pie_server.engine.engine import Engine
from tests.inferlets.contrib.conftest import Builder, assert_pages_free, events, ok, run

PROMPT = "Once upon a time, in a small village by the sea,"
KEY, GAMMA, DELTA, MAX_TOKENS, THRESHOLD = 15485863, 0.25, 4.0, 40, 4.0
MASK64 = (1 << 64) - 1

INFERLETS = ("watermark",)  # built in the background (conftest.py)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build(INFERLETS[0], real_engine)


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def _mix64(x: Any) -> Any:
    """splitmix64's finalizer (the inferlet's hash) over a Python int or a numpy uint64 array."""
    u = np.uint64
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, as the inferlet masks it
        x = np.asarray(x, dtype=u) + u(0x9E3779B97F4A7C15)
        x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
        return x ^ (x >> u(31))


def _green_mask(prev_id: int, vocab_size: int) -> np.ndarray:
    seed = _mix64((KEY ^ (prev_id << 20)) & MASK64)
    return _mix64(seed ^ np.arange(vocab_size, dtype=np.uint64)) < np.uint64(int(GAMMA * 2 ** 64))


def _generate(engine: Engine, program: str, *extra: str) -> dict[str, Any]:
    messages = run(engine, program, ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--delta", str(DELTA),
                                     "--gamma", str(GAMMA), "--key", str(KEY), *extra])
    ok(messages)
    [report] = events(messages)
    return report


def _detect(engine: Engine, program: str, text: str) -> dict[str, Any]:
    messages = run(engine, program, ["--detect", text, "--gamma", str(GAMMA), "--key", str(KEY)])
    ok(messages)
    [report] = events(messages)
    return report


def test_each_token_is_the_biased_argmax_over_the_vocabulary(real_engine: Engine, program: str,
                                                             model: LlamaForCausalLM) -> None:
    report = _generate(real_engine, program, "--top-k", "2")  # too narrow: steps must be asked again
    prompt_ids = real_engine.tokenizer.encode(PROMPT)
    output = report["token_ids"]
    assert len(output) == MAX_TOKENS
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output])).logits[0, len(prompt_ids) - 1:-1]
    logprobs = logits.double().log_softmax(-1).numpy()
    context = prompt_ids + output
    for j, token_id in enumerate(output):
        biased = logprobs[j] + DELTA * _green_mask(context[len(prompt_ids) + j - 1], logprobs.shape[1])
        assert token_id == int(biased.argmax()), j
    assert report["num_rewinds"] > 0
    assert report["num_forward_calls"] == MAX_TOKENS + report["num_rewinds"]
    assert report["z_score"] > THRESHOLD and report["watermarked"]
    assert_pages_free(real_engine)


def test_the_detector_recognises_its_own_text_only(real_engine: Engine, program: str,
                                                   model: LlamaForCausalLM) -> None:
    marked = _generate(real_engine, program)
    sampled = _generate(real_engine, program, "--temperature", "0.7", "--seed", "3")
    prompt_ids = real_engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        plain_ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    plain = real_engine.tokenizer.decode(plain_ids[0, len(prompt_ids):].tolist())
    assert sampled["token_ids"] != marked["token_ids"]
    for text in (marked["text"], sampled["text"]):
        found = _detect(real_engine, program, text)
        assert found["z_score"] > THRESHOLD and found["watermarked"], (text, found)
    unmarked = _detect(real_engine, program, plain)
    assert unmarked["z_score"] < 2.0 and not unmarked["watermarked"], (plain, unmarked)
    assert unmarked["num_scored"] >= MAX_TOKENS // 2
    assert_pages_free(real_engine)

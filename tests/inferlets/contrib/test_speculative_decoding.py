"""speculative-decoding (inferlets/contrib/speculative-decoding) on the default model (SmolLM2-135M): its
output is exactly greedy decoding's (the executor driven directly), and on a prompt that repeats itself it
takes fewer forward passes than it generates tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pie_server.engine.config import EngineConfig
from pie_server.engine.engine import Engine
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.loader import load_model_config, load_weights
from pie_server.engine.runtime.messages import Text
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run

# The model copies the second text (its greedy output starts with the 30 tokens of that sentence).
REPETITIVE = ("Copy the text.\nText: The quick brown fox jumps over the lazy dog.\n"
              "Copy: The quick brown fox jumps over the lazy dog.\nText: When the winter storms came, the villagers "
              "gathered wood, sealed their windows with clay and told old stories by the fire until spring "
              "returned to the valley.\nCopy:")
PLAIN = "The history of the printing press begins"
MAX_TOKENS = 32

INFERLETS = ("speculative-decoding",)  # built in the background (conftest.py)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build(INFERLETS[0], real_engine)


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> DirectGenerator:
    executor = Executor(load_model_config(default_model_dir), EngineConfig(page_size=PAGE_SIZE, num_pages=32),
                        load_weights(default_model_dir, torch.float32, progress=False))
    return DirectGenerator(executor)


def _greedy(reference: DirectGenerator, engine: Engine, prompt: str) -> list[int]:
    """Greedy tokens up to MAX_TOKENS, cut after the first end-of-sequence token."""
    tokens = reference.generate([engine.tokenizer.encode(prompt)], MAX_TOKENS)[0]
    eos = [i for i, t in enumerate(tokens) if t in engine.tokenizer.eos_token_ids]
    return tokens[:eos[0] + 1] if eos else tokens


@pytest.mark.parametrize("prompt", [REPETITIVE, PLAIN], ids=["repetitive", "plain"])
def test_output_equals_greedy_decoding(real_engine: Engine, program: str, reference: DirectGenerator,
                                       prompt: str) -> None:
    messages = run(real_engine, program, ["--prompt", prompt, "--max-tokens", str(MAX_TOKENS)])
    ok(messages)
    [report] = events(messages)
    expected = _greedy(reference, real_engine, prompt)
    assert report["token_ids"] == expected
    streamed = "".join(m.text for m in messages if isinstance(m, Text))
    assert streamed == real_engine.tokenizer.decode([t for t in expected
                                                     if t not in real_engine.tokenizer.eos_token_ids])
    assert report["num_forward_calls"] == report["num_tokens"] - report["num_accepted"]
    if prompt == REPETITIVE:  # drafts looked up in the prompt are mostly right
        assert report["num_forward_calls"] * 3 < report["num_tokens"] == MAX_TOKENS
    assert_pages_free(real_engine)


def test_without_drafts_it_takes_one_pass_per_token(real_engine: Engine, program: str) -> None:
    messages = run(real_engine, program, ["--prompt", REPETITIVE, "--max-tokens", "12", "--num-draft", "0"])
    ok(messages)
    [report] = events(messages)
    assert report["num_forward_calls"] == report["num_tokens"] == 12 and report["num_drafted"] == 0

"""attention-sink (inferlets/contrib/attention-sink): its KV memory stays flat over 2,000 generated tokens (the
inferlet's own page counts and the engine's physical pages), positions are rebased when they reach
--max-position and the streamed text is the tokens' (mechanics only: the tiny random Llama, fast); and, on
SmolLM2-135M, each token really attends to exactly the sink tokens and the window the inferlet reports: its
greedy tokens and their logprobs are transformers' under that attention mask."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Message, Text
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run
from tests.inferlets.contrib.step_recorder import StepRecorder

pytestmark = pytest.mark.timeout(600)

LONG_RUN_TOKENS, LONG_WINDOW, MAX_POSITION = 2000, 64, 1024
LONG_RUN_TIMEOUT_S = 300.0  # ~4 s on the tiny model (SmolLM2 took 35 s idle, 180 s on shared cores)
STORY_PROMPT = "Write a long story about a dragon who guards a library."
REFERENCE_PROMPT = ("The old lighthouse keeper climbed the stairs every evening, counting each step, and at the "
                    "top he lit the lamp and watched the ships pass in the dark.")  # 30+ tokens: 2 pages
SINKS, WINDOW, CHUNK, REFERENCE_TOKENS = 4, 24, 8, 64
TIE_TOLERANCE = 1e-3  # logits this close are a tie: either token is a correct argmax
LOGPROB_TOLERANCE = 2e-3  # the engine's float32 kernels against transformers' (one step off shows as > 0.02)


INFERLETS = ("attention-sink",)  # built in the background (conftest.py)


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build(INFERLETS[0], real_engine)


@pytest.fixture(scope="module")
def tiny_program(build: Builder, engine: Engine) -> str:
    return build(INFERLETS[0], engine)


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def _streamed(messages: list[Message]) -> str:
    return "".join(m.text for m in messages if isinstance(m, Text) and m.channel == 0)


def test_pages_stay_flat_over_2000_tokens(engine: Engine, tiny_program: str) -> None:
    args = ["--prompt", STORY_PROMPT, "--chat", "--max-tokens", str(LONG_RUN_TOKENS), "--ignore-eos",
            "--window", str(LONG_WINDOW), "--max-position", str(MAX_POSITION), "--temperature", "0.7",
            "--seed", "1", "--report-every", "1"]
    with StepRecorder(engine) as steps:
        messages = engine.runtime.launch(tiny_program, args).messages(LONG_RUN_TIMEOUT_S)
    ok(messages)
    *progress, done = events(messages)
    assert done["generated"] == LONG_RUN_TOKENS and done["rebases"] >= 1  # 2,000 tokens pass position 1,024
    # Pages: one sink page, the window (64 tokens, plus up to a page, plus the chunk being generated), however
    # long the text: the same bound at token 2,000 as at token 200.
    bound = 1 + -(-(LONG_WINDOW + PAGE_SIZE - 1 + PAGE_SIZE) // PAGE_SIZE)
    settled = [p["progress"]["pages"] for p in progress if p["generated"] >= 2 * LONG_WINDOW]
    assert max(settled) <= bound and max(settled) - min(settled) <= 1, settled
    assert done["max_pages"] <= bound and done["evicted_pages"] >= (LONG_RUN_TOKENS - 2 * LONG_WINDOW) // PAGE_SIZE
    assert steps.peak_used_pages <= bound + 1  # + the page of room the host's decode loop keeps ahead
    token_ids = [t for p in progress for t in p["token_ids"]]
    assert len(token_ids) == LONG_RUN_TOKENS
    assert all(0 <= t < engine.model_config.vocab_size for t in token_ids)
    text = _streamed(messages)
    assert text == engine.tokenizer.decode(token_ids)  # streamed in pieces, nothing lost or split
    assert_pages_free(engine)


def test_each_token_sees_exactly_the_sinks_and_its_window(real_engine: Engine, program: str, hf_model: Any) -> None:
    args = ["--prompt", REFERENCE_PROMPT, "--max-tokens", str(REFERENCE_TOKENS), "--ignore-eos",
            "--sink-tokens", str(SINKS), "--window", str(WINDOW), "--chunk", str(CHUNK), "--report-every", "1",
            "--logprobs"]
    messages = run(real_engine, program, args)
    ok(messages)
    *chunks, done = events(messages)
    prompt_ids = real_engine.tokenizer.encode(REFERENCE_PROMPT)
    generated = [t for c in chunks for t in c["token_ids"]]
    sequence = prompt_ids + generated
    assert len(generated) == REFERENCE_TOKENS and done["evicted_pages"] >= 2
    # The window policy: before each chunk at least WINDOW tokens, less than a page more, stay visible.
    for chunk in chunks[1:]:
        if chunk["visible_from"] > SINKS:
            assert WINDOW <= chunk["first_index"] - chunk["visible_from"] < WINDOW + PAGE_SIZE, chunk
    mask = _sink_mask(chunks, len(sequence) - 1)
    with torch.no_grad():
        masked = hf_model(torch.tensor([sequence[:-1]]), attention_mask=mask[None, None]).logits[0]
        causal = hf_model(torch.tensor([sequence[:-1]])).logits[0]
    positions = range(len(prompt_ids) - 1, len(sequence) - 1)  # logits row i predicts token i + 1
    assert all(_is_argmax(masked[i], sequence[i + 1]) for i in positions)
    logprobs = [lp for c in chunks for lp in c["logprobs"]]
    expected = masked.log_softmax(-1)
    assert logprobs == pytest.approx([float(expected[i, sequence[i + 1]]) for i in positions], abs=LOGPROB_TOLERANCE)
    unmasked = causal.log_softmax(-1)  # attending to one token more or less would change them: the mask mattered
    assert logprobs != pytest.approx([float(unmasked[i, sequence[i + 1]]) for i in positions], abs=0.05)
    assert_pages_free(real_engine)


def _sink_mask(chunks: list[dict[str, Any]], num_queries: int) -> torch.Tensor:
    """Row i: the sinks, and the tokens from its chunk's visible_from up to i (causal)."""
    mask = torch.zeros(num_queries, num_queries, dtype=torch.bool)
    starts = [c["first_index"] for c in chunks] + [num_queries]
    for chunk, start, end in zip(chunks, starts, starts[1:]):
        for i in range(start, end):
            mask[i, :min(SINKS, i + 1)] = True
            mask[i, chunk["visible_from"]:i + 1] = True
    return mask


def _is_argmax(logits: torch.Tensor, token_id: int) -> bool:
    return bool(logits[token_id] >= logits.max() - TIE_TOLERANCE)

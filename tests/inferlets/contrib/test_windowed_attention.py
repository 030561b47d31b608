"""windowed-attention (inferlets/contrib/windowed-attention): over 2,000 generated tokens exactly --window slots
stay visible and the pages stay flat (the inferlet's counts and the engine's physical pages), positions are
rebased at --max-position and the streamed text is the tokens' (mechanics only: the tiny random Llama, fast);
and, on SmolLM2-135M, the tokens and their logprobs are transformers' greedy argmax and log-softmax under the
sliding-window mask itself (every token, prompt included, sees the --window latest tokens)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Text
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run
from tests.inferlets.contrib.step_recorder import StepRecorder

pytestmark = pytest.mark.timeout(600)

LONG_RUN_TOKENS, LONG_WINDOW, MAX_POSITION, REPORT_EVERY = 2000, 48, 1024, 100
LONG_RUN_TIMEOUT_S = 300.0  # ~5 s on the tiny model (SmolLM2 took 40 s idle, 150 s on shared cores)
STORY_PROMPT = "Write a long story about a dragon who guards a library."
REFERENCE_PROMPT = ("The old lighthouse keeper climbed the stairs every evening, counting each step, and at the "
                    "top he lit the lamp and watched the ships pass in the dark.")  # longer than WINDOW
WINDOW, REFERENCE_TOKENS = 20, 48
TIE_TOLERANCE = 1e-3  # logits this close are a tie: either token is a correct argmax
LOGPROB_TOLERANCE = 2e-3  # the engine's float32 kernels against transformers' (one slot off shows as > 0.02)


INFERLETS = ("windowed-attention",)  # built in the background (conftest.py)


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build(INFERLETS[0], real_engine)


@pytest.fixture(scope="module")
def tiny_program(build: Builder, engine: Engine) -> str:
    return build(INFERLETS[0], engine)


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def test_window_and_pages_stay_flat_over_2000_tokens(engine: Engine, tiny_program: str) -> None:
    args = ["--prompt", STORY_PROMPT, "--chat", "--max-tokens", str(LONG_RUN_TOKENS), "--ignore-eos",
            "--window", str(LONG_WINDOW), "--max-position", str(MAX_POSITION), "--temperature", "0.7",
            "--seed", "1", "--report-every", str(REPORT_EVERY)]
    with StepRecorder(engine) as steps:
        messages = engine.runtime.launch(tiny_program, args).messages(LONG_RUN_TIMEOUT_S)
    ok(messages)
    *progress, done = events(messages)
    assert done["generated"] == LONG_RUN_TOKENS and done["rebases"] >= 1  # 2,000 tokens pass position 1,024
    assert len(progress) == LONG_RUN_TOKENS // REPORT_EVERY
    # Exactly the window is visible at every report; its slots span at most one page more than it needs.
    assert {p["progress"]["visible"] for p in progress} == {LONG_WINDOW}
    bound = -(-LONG_WINDOW // PAGE_SIZE) + 1
    assert max(p["progress"]["pages"] for p in progress) <= bound and done["max_pages"] <= bound
    assert done["freed_pages"] >= (LONG_RUN_TOKENS - 2 * LONG_WINDOW) // PAGE_SIZE
    assert steps.peak_used_pages <= bound and steps.num_steps >= LONG_RUN_TOKENS
    token_ids = [t for p in progress for t in p["token_ids"]]
    assert len(token_ids) == LONG_RUN_TOKENS
    assert all(0 <= t < engine.model_config.vocab_size for t in token_ids)
    text = "".join(m.text for m in messages if isinstance(m, Text) and m.channel == 0)
    assert text == engine.tokenizer.decode(token_ids)  # streamed in pieces, nothing lost or split
    assert_pages_free(engine)


def test_each_token_sees_exactly_its_window(real_engine: Engine, program: str, hf_model: Any) -> None:
    messages = run(real_engine, program, ["--prompt", REFERENCE_PROMPT, "--max-tokens", str(REFERENCE_TOKENS),
                                          "--ignore-eos", "--window", str(WINDOW),
                                          "--report-every", str(REFERENCE_TOKENS), "--logprobs"])
    ok(messages)
    [report, done] = events(messages)
    prompt_ids = real_engine.tokenizer.encode(REFERENCE_PROMPT)
    assert len(prompt_ids) > WINDOW  # the prompt itself is prefilled under the band mask
    sequence = prompt_ids + report["token_ids"]
    assert done["visible"] == WINDOW and done["freed_pages"] >= 3
    num_queries = len(sequence) - 1
    rows = torch.arange(num_queries)[:, None]
    band = (rows >= torch.arange(num_queries)) & (rows - torch.arange(num_queries) < WINDOW)
    with torch.no_grad():
        windowed = hf_model(torch.tensor([sequence[:-1]]), attention_mask=band[None, None]).logits[0]
        causal = hf_model(torch.tensor([sequence[:-1]])).logits[0]
    positions = range(len(prompt_ids) - 1, num_queries)  # logits row i predicts token i + 1
    assert all(_is_argmax(windowed[i], sequence[i + 1]) for i in positions)
    expected = windowed.log_softmax(-1)
    assert report["logprobs"] == pytest.approx([float(expected[i, sequence[i + 1]]) for i in positions],
                                               abs=LOGPROB_TOLERANCE)
    unmasked = causal.log_softmax(-1)  # a window one token wider or narrower would be off by > 0.02 too
    assert report["logprobs"] != pytest.approx([float(unmasked[i, sequence[i + 1]]) for i in positions],
                                               abs=0.05)
    assert_pages_free(real_engine)


def _is_argmax(logits: torch.Tensor, token_id: int) -> bool:
    return bool(logits[token_id] >= logits.max() - TIE_TOLERANCE)

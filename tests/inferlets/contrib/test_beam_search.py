"""beam-search (inferlets/contrib/beam-search) on the tiny random Llama: its beams and scores equal a reference
beam search computed here from the same weights' full logits (transformers, a fresh forward per beam and
step), each score is the model's log-probability of its beam, and the beams share the prompt's KV pages."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from pie_server.engine.engine import Engine
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run

# 2 full pages and 7 tokens: the beams share the full pages
PROMPT = ("Beam search keeps several partial answers at every step and extends each of them with the likely "
          "next words, so that a sentence which starts unlikely can still win in the end when it continues well.")
WIDTH, MAX_TOKENS, LENGTH_PENALTY = 3, 8, 1.0

INFERLETS = ("beam-search",)  # built in the background (conftest.py)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def program(build: Builder) -> str:
    return build(INFERLETS[0])


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def _logprobs(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """log p(next | token_ids) over the vocabulary, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, -1]
    return logits.double().log_softmax(-1)


def reference_beam_search(model: LlamaForCausalLM, prompt_ids: list[int], eos_ids: set[int]) -> list[dict[str, Any]]:
    """The algorithm the inferlet's README states, over full logits."""
    alive: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    num_steps = 0
    while alive and len(finished) < WIDTH and num_steps < MAX_TOKENS:
        num_steps += 1
        candidates = []
        for i, (ids, score) in enumerate(alive):
            top = _logprobs(model, prompt_ids + ids).topk(2 * WIDTH)
            candidates += [(score + float(lp), i, rank, int(t)) for rank, (lp, t) in enumerate(zip(*top))]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        next_alive: list[tuple[list[int], float]] = []
        for position, (score, i, _, token_id) in enumerate(candidates):
            if token_id in eos_ids:
                if position < WIDTH:
                    finished.append((alive[i][0] + [token_id], score))
                continue
            next_alive.append((alive[i][0] + [token_id], score))
            if len(next_alive) == WIDTH:
                break
        alive = next_alive
    ranked = sorted(finished + alive, key=lambda r: -r[1] / max(len(r[0]), 1) ** LENGTH_PENALTY)
    return [{"token_ids": ids, "score": score} for ids, score in ranked[:WIDTH]]


def test_beams_equal_a_reference_beam_search(engine: Engine, program: str, model: LlamaForCausalLM) -> None:
    messages = run(engine, program, ["--prompt", PROMPT, "--beams", str(WIDTH), "--max-tokens", str(MAX_TOKENS)])
    ok(messages)
    [report] = events(messages)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    expected = reference_beam_search(model, prompt_ids, set(engine.tokenizer.eos_token_ids))
    assert [b["token_ids"] for b in report["beams"]] == [b["token_ids"] for b in expected]
    for beam, want in zip(report["beams"], expected):
        assert beam["score"] == pytest.approx(want["score"], abs=1e-4)
        # the score is the model's log-probability of the beam, token by token
        direct = sum(float(_logprobs(model, prompt_ids + beam["token_ids"][:j])[t])
                     for j, t in enumerate(beam["token_ids"]))
        assert beam["score"] == pytest.approx(direct, abs=1e-4)
        assert beam["normalized_score"] == pytest.approx(beam["score"] / len(beam["token_ids"]))
    assert len({tuple(b["token_ids"]) for b in report["beams"]}) == WIDTH
    assert report["num_forward_calls"] == report["num_steps"] == MAX_TOKENS  # one host call per step
    assert_pages_free(engine)


def test_beams_share_the_prompts_pages(engine: Engine, program: str) -> None:
    messages = run(engine, program, ["--prompt", PROMPT, "--beams", "4", "--max-tokens", "3"])
    ok(messages)
    [report] = events(messages)
    pages = report["pages"]
    num_prompt_pages, num_partial = divmod(len(engine.tokenizer.encode(PROMPT)), PAGE_SIZE)
    assert num_prompt_pages >= 2 and num_partial + 2 < PAGE_SIZE  # 3 steps stay within the partial page
    # 4 beams, each holding the prompt's full pages + its own partial page; the full ones exist once
    assert pages["num_page_ids"] == 4 * (num_prompt_pages + 1) == pages["num_unshared_pages"]
    assert pages["num_physical_pages"] == num_prompt_pages + 4
    assert pages["num_shared_pages"] == num_prompt_pages
    assert math.isfinite(report["beams"][0]["score"])
    assert_pages_free(engine)

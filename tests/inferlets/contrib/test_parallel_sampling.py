"""parallel-sampling (inferlets/contrib/parallel-sampling) on the tiny random Llama: the n samples share the
prompt's pages (the inferlet's own page counts, checked against the prompt's length), the chosen sample has
the highest mean logprob, those means are the model's (recomputed here with transformers over the same
weights), and a seed makes the whole result reproducible."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Text
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run

PROMPT = ("A best-of-n sampler draws several answers to the same question and keeps the one the model "
          "itself finds most likely, token for token.")  # 1 full page and a partial one
N, MAX_TOKENS = 4, 10

INFERLETS = ("parallel-sampling",)  # built in the background (conftest.py)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def program(build: Builder) -> str:
    return build(INFERLETS[0])


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def _sample(engine: Engine, program: str, seed: int) -> tuple[dict[str, Any], str]:
    messages = run(engine, program, ["--prompt", PROMPT, "--n", str(N), "--max-tokens", str(MAX_TOKENS),
                                     "--seed", str(seed)])
    ok(messages)
    [report] = events(messages)
    return report, "".join(m.text for m in messages if isinstance(m, Text))


def _mean_logprob(model: LlamaForCausalLM, prompt_ids: list[int], token_ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0]
    logprobs = logits.double().log_softmax(-1)[len(prompt_ids) - 1:-1]
    return float(logprobs.gather(1, torch.tensor(token_ids)[:, None]).mean())


def test_the_best_sample_has_the_highest_mean_logprob(engine: Engine, program: str,
                                                      model: LlamaForCausalLM) -> None:
    report, streamed = _sample(engine, program, seed=7)
    samples = report["samples"]
    assert len(samples) == N and len({tuple(s["token_ids"]) for s in samples}) == N  # seed + i each
    prompt_ids = engine.tokenizer.encode(PROMPT)
    for sample in samples:
        assert sample["mean_logprob"] == pytest.approx(_mean_logprob(model, prompt_ids, sample["token_ids"]),
                                                       abs=1e-4)
    best = samples[report["best"]]
    assert best["mean_logprob"] == max(s["mean_logprob"] for s in samples)
    assert streamed == best["text"]
    assert_pages_free(engine)


def test_samples_share_the_prompts_pages(engine: Engine, program: str) -> None:
    report, _ = _sample(engine, program, seed=7)
    num_prompt = report["num_prompt_tokens"]
    num_full, num_partial = divmod(num_prompt - 1, PAGE_SIZE)  # forking flushed all but the last token
    assert num_full >= 1 and num_partial > 0
    # n contexts name the prompt's full pages, each has its own copy of the partial page
    assert report["pages"]["after_fork"] == {"num_page_ids": N * (num_full + 1),
                                             "num_physical_pages": num_full + N, "num_shared_pages": num_full}
    own = [-(-(num_prompt + len(s["token_ids"]) - 1) // PAGE_SIZE) - num_full for s in report["samples"]]
    assert report["pages"]["after_generation"] == {"num_page_ids": N * num_full + sum(own),
                                                   "num_physical_pages": num_full + sum(own),
                                                   "num_shared_pages": num_full}
    assert_pages_free(engine)


def test_a_seed_makes_it_reproducible(engine: Engine, program: str) -> None:
    first, _ = _sample(engine, program, seed=11)
    again, _ = _sample(engine, program, seed=11)
    other, _ = _sample(engine, program, seed=12)
    assert again == first
    assert [s["token_ids"] for s in other["samples"]] != [s["token_ids"] for s in first["samples"]]

"""skeleton-of-thought (inferlets/contrib/skeleton-of-thought) on SmolLM2-135M: the skeleton is a numbered list,
the answer assembles the points' expansions in order (each also streamed on its own channel), the expansions
are decoded in the same engine steps, and they share the common prefix's KV pages (the engine's physical pages
count them once)."""
from __future__ import annotations

import pytest

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Text
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run
from tests.inferlets.contrib.step_recorder import StepRecorder

pytestmark = pytest.mark.timeout(600)
INFERLETS = ("skeleton-of-thought",)  # built in the background (conftest.py)

QUESTION = "How can I sleep better?"
MAX_POINTS = 4


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build("skeleton-of-thought", real_engine)


def test_points_expand_together_and_assemble_in_order(real_engine: Engine, program: str) -> None:
    with StepRecorder(real_engine) as steps:
        messages = run(real_engine, program, ["--question", QUESTION, "--max-points", str(MAX_POINTS)])
    ok(messages)
    [report] = events(messages)
    points, branches = report["skeleton"], report["branches"]
    streamed: dict[int, str] = {}
    for m in messages:
        if isinstance(m, Text):
            streamed[m.channel] = streamed.get(m.channel, "") + m.text

    # The skeleton: 2..MAX_POINTS numbered points, streamed first on channel 0.
    assert 2 <= len(points) <= MAX_POINTS and [b["point"] for b in branches] == points
    skeleton_text, _, _ = streamed[0].partition("\n\n")
    assert [line.strip() for line in skeleton_text.split("\n")] == [f"{i}. {p}" for i, p in enumerate(points, 1)]
    # The answer: point i's line is "i. <point>: <expansion>", in order; each expansion came on channel i.
    assert all(b["expansion"] for b in branches)  # every point was written about
    lines = [f"{i}. {b['point']}: {b['expansion']}" for i, b in enumerate(branches, 1)]
    assert report["answer"] == "\n".join(lines) and streamed[0].endswith("\n\n" + report["answer"])
    for i, branch in enumerate(branches, 1):
        assert " ".join(streamed[i].split()) == branch["expansion"]

    # Concurrency: all the expansions in one step; fewer steps than the skeleton and the expansions' tokens.
    assert max(steps.batch_sizes) >= len(points)
    skeleton_tokens = len(real_engine.tokenizer.encode(skeleton_text))
    assert steps.num_steps < skeleton_tokens + sum(b["num_tokens"] for b in branches)
    # Sharing: each branch's page table starts with the common prefix's full pages, held once by the engine.
    pages = report["pages"]
    assert pages["shared_pages"] == (pages["common_tokens"] - 1) // PAGE_SIZE  # fork keeps the last one pending
    assert pages["shared_pages"] >= 3 and min(pages["branch_pages"]) > pages["shared_pages"]
    unshared = sum(pages["branch_pages"])
    private = unshared - len(points) * pages["shared_pages"]
    assert steps.peak_used_pages <= pages["shared_pages"] + private + len(points)  # + each one's page of room
    assert steps.peak_used_pages < unshared
    assert_pages_free(real_engine)

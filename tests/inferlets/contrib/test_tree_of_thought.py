"""tree-of-thought (inferlets/contrib/tree-of-thought) on SmolLM2-135M: the search keeps the best-judged nodes of
each level and answers from the best path; the children of a level are decoded in the same engine steps
(batches as wide as the level, fewer steps than tokens); and the tree shares its prefixes' KV pages (the
engine's physical pages stay well below the contexts' page-table sizes)."""
from __future__ import annotations

from collections import defaultdict

import pytest

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Text
from tests.inferlets.contrib.conftest import Builder, assert_pages_free, events, ok, run
from tests.inferlets.contrib.step_recorder import StepRecorder

pytestmark = pytest.mark.timeout(600)
INFERLETS = ("tree-of-thought",)  # built in the background (conftest.py)

PROBLEM = ("Tom has 3 apples. He buys 5 more apples at the market and then eats 2 of them on the way home. "
           "How many apples does Tom have when he gets home?")
DEPTH, BRANCHES, BEAM = 2, 3, 2
CONCLUDE_PROMPT = "Therefore, the final answer is"


@pytest.fixture(scope="module")
def program(build: Builder, real_engine: Engine) -> str:
    return build("tree-of-thought", real_engine)


def test_search_batches_and_sharing(real_engine: Engine, program: str) -> None:
    with StepRecorder(real_engine) as steps:
        messages = run(real_engine, program, ["--problem", PROBLEM, "--depth", str(DEPTH), "--branches",
                                              str(BRANCHES), "--beam", str(BEAM), "--seed", "3"])
    ok(messages)
    [report] = events(messages)
    nodes = {n["id"]: n for n in report["tree"]}
    levels: dict[int, list[dict]] = defaultdict(list)
    for node in report["tree"][1:]:
        levels[node["depth"]].append(node)

    # The search: every kept node of a level has BRANCHES children on the next; the kept ones are the best.
    assert [len(levels[d]) for d in range(1, DEPTH + 1)] == [BRANCHES] + [BEAM * BRANCHES] * (DEPTH - 1)
    for depth in range(1, DEPTH + 1):
        kept = [n for n in levels[depth] if n["kept"]]
        dropped = [n for n in levels[depth] if not n["kept"]]
        assert len(kept) == BEAM and min(n["score"] for n in kept) >= max(n["score"] for n in dropped)
        parents = [n["parent"] for n in levels[depth]]
        expected_parents = [0] if depth == 1 else [n["id"] for n in levels[depth - 1] if n["kept"]]
        assert sorted(set(parents)) == sorted(expected_parents)
        assert all(parents.count(p) == BRANCHES for p in expected_parents)
    scores = [n["score"] for n in report["tree"][1:]]
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1  # the judge tells nodes apart

    # The answer: the best final node's path, its thoughts one per line, then the conclusion (streamed).
    path = report["best_path"]
    leaf = max((n for n in levels[DEPTH] if n["kept"]), key=lambda n: (n["score"], -n["id"]))
    assert path[-1] == leaf["id"] and len(path) == DEPTH
    assert [nodes[i]["parent"] for i in path] == [0, *path[:-1]]
    thoughts = "\n".join(nodes[i]["thought"] for i in path)
    assert report["answer"] == f"{thoughts}\n{CONCLUDE_PROMPT}{report['conclusion']}"
    assert "".join(m.text for m in messages if isinstance(m, Text) and m.channel == 0) == report["conclusion"]

    # Concurrency: a whole level (and its judges) in one step; far fewer steps than one per token.
    assert max(steps.batch_sizes) >= BEAM * BRANCHES
    num_tokens = sum(n["num_tokens"] for n in report["tree"]) + report["conclusion_tokens"]
    assert steps.num_steps < num_tokens
    # Sharing: at the widest point the contexts' page tables name far more pages than the engine holds.
    widest = max(level["virtual_pages"] for level in report["levels"])
    assert steps.peak_used_pages < 0.6 * widest, (steps.peak_used_pages, report["levels"])
    assert_pages_free(real_engine)

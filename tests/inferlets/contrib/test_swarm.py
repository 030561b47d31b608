"""swarm end to end (componentize-py build, real runtime, control layer and executor; tiny random Llama with the
default model's tokenizer, CPU): agents launched together meet over a broadcast topic and each sees every other
agent's line of every round (the same table of lines in every agent), which they write from their own contexts,
kept in the engine between rounds (the executor computes each agent's tokens once: only what is new is sent)."""
from __future__ import annotations

from typing import Any

import pytest

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Terminated
from tests.inferlets.contrib.conftest import TIMEOUT_S, Builder, assert_pages_free, events, ok

NAMES = ("alice", "bob", "carol")
NUM_ROUNDS = 2

pytestmark = pytest.mark.timeout(600)
INFERLETS = ("swarm",)  # built in the background (conftest.py)


@pytest.fixture(scope="module")
def program(build: Builder) -> str:
    return build("swarm")


def _run_swarm(engine: Engine, program: str, topic: str, names: tuple[str, ...]) -> list[list[dict[str, Any]]]:
    handles = [engine.runtime.launch(program, ["--topic", topic, "--size", str(len(names)), "--name", name,
                                               "--task", "Name three things to bring to a picnic.",
                                               "--rounds", str(NUM_ROUNDS), "--max-tokens", "6", "--timeout-s", "60"])
               for name in names]
    results = []
    for handle in handles:
        messages = handle.messages(TIMEOUT_S)
        ok(messages)
        results.append(events(messages))
    return results


def test_every_agent_sees_every_other_agents_lines(engine: Engine, program: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    executor_tokens = [0]
    submit = engine.executor.submit

    def counted(batch):  # noqa: ANN001, ANN202
        executor_tokens[0] += sum(len(command.token_ids) for command in batch.forwards)
        return submit(batch)

    monkeypatch.setattr(engine.executor, "submit", counted)
    results = _run_swarm(engine, program, "picnic", NAMES)
    finals = [agent_events[-1] for agent_events in results]
    assert [f["name"] for f in finals] == list(NAMES)
    for final in finals:
        assert final["type"] == "swarm" and final["peers"] == sorted(set(NAMES) - {final["name"]})
        assert len(final["rounds"]) == NUM_ROUNDS
        for lines in final["rounds"]:
            assert [line["from"] for line in lines] == sorted(NAMES)
    # One shared table: what each agent wrote is exactly what each other agent received.
    assert finals[0]["rounds"] == finals[1]["rounds"] == finals[2]["rounds"]
    # Per-round events came as the rounds went, and the lines were written (not empty placeholders).
    for agent_events in results:
        assert [e["round"] for e in agent_events[:-1]] == list(range(NUM_ROUNDS))
    assert all(line["text"].strip() for lines in finals[0]["rounds"] for line in lines)
    # Each agent's context holds the others' lines of the earlier rounds (its KV grew by them), and no context
    # was prefilled twice: the executor computed exactly the tokens whose KV the agents hold, once each.
    assert all(f["kv_len"] > f["num_heard_tokens"] > 0 for f in finals)
    assert executor_tokens[0] == sum(f["kv_len"] for f in finals)
    assert_pages_free(engine)


def test_an_agent_whose_peers_never_come_fails_with_a_clear_error(engine: Engine, program: str) -> None:
    handle = engine.runtime.launch(program, ["--topic", "alone", "--size", "2", "--name", "solo",
                                             "--task", "Wait.", "--timeout-s", "0.5"])
    end = handle.messages(TIMEOUT_S)[-1]
    assert isinstance(end, Terminated) and not end.ok
    assert "solo waited 0.5 s to meet the others on topic 'alone'" in (end.error or "")

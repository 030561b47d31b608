"""prefix-cache end to end (componentize-py build, real runtime, control layer and executor; tiny random Llama with
the default model's tokenizer, CPU): a second run imports the system prompt's pages instead of prefilling them,
prefills fewer tokens (the executor counts them) and answers exactly as the first (greedy)."""
from __future__ import annotations

from typing import Any

import pytest

from pie_server.engine.engine import Engine
from pie_server.engine.runtime.messages import Text
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run

SYSTEM = ("You are the assistant of a small bakery in Lyon. You answer questions about opening hours, bread, "
          "cakes, prices and orders, briefly and politely, in the customer's language.")  # a few pages
NAME = "bakery"

pytestmark = pytest.mark.timeout(600)
INFERLETS = ("prefix-cache",)  # built in the background (conftest.py)


@pytest.fixture(scope="module")
def program(build: Builder) -> str:
    return build("prefix-cache")


def _run(engine: Engine, program: str, args: list[str], executor_tokens: list[int]) -> tuple[dict[str, Any], str, int]:
    """(the final event, the streamed text, tokens the executor computed for this run)."""
    before = executor_tokens[0]
    messages = run(engine, program, args)
    ok(messages)
    [event] = events(messages)
    return event, "".join(m.text for m in messages if isinstance(m, Text)), executor_tokens[0] - before


def test_a_later_run_imports_the_system_prompt_and_answers_the_same(engine: Engine, program: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    executor_tokens = [0]
    submit = engine.executor.submit

    def counted(batch):  # noqa: ANN001, ANN202
        executor_tokens[0] += sum(len(command.token_ids) for command in batch.forwards)
        return submit(batch)

    monkeypatch.setattr(engine.executor, "submit", counted)
    ask = ["--name", NAME, "--system", SYSTEM, "--prompt", "When do you open on Sunday?", "--max-tokens", "8"]
    first, first_text, first_tokens = _run(engine, program, ask, executor_tokens)
    second, second_text, second_tokens = _run(engine, program, ask, executor_tokens)
    assert (first["export"], second["export"]) == ("exported", "imported")
    num_prompt = first["num_prompt_tokens"]
    assert second["num_prompt_tokens"] == num_prompt and first["num_reused_tokens"] == 0
    # The import brings every full page of the system prompt; only its partial last page and the user's
    # message are prefilled again.
    num_system_pages = second["num_reused_tokens"] // PAGE_SIZE
    assert num_system_pages >= 2 and second["num_reused_tokens"] == num_system_pages * PAGE_SIZE
    assert second["num_prefilled_tokens"] == num_prompt - second["num_reused_tokens"]
    # What the executor really computed: prompt + generated tokens (but the last), minus the imported ones.
    assert first_tokens == num_prompt + len(first["token_ids"]) - 1
    assert second_tokens == first_tokens - second["num_reused_tokens"]
    assert second["token_ids"] == first["token_ids"] and second["text"] == first["text"] == first_text == second_text
    # Another system prompt under the same name: the export is not used (and not replaced).
    other = ["--name", NAME, "--system", SYSTEM.replace("Lyon", "Nantes"), "--prompt", "Hi", "--max-tokens", "2"]
    stale, _, _ = _run(engine, program, other, executor_tokens)
    assert stale["export"] == "stale" and stale["num_reused_tokens"] == 0
    assert _run(engine, program, ask, executor_tokens)[0]["export"] == "imported"
    dropped, _, _ = _run(engine, program, ["--name", NAME, "--drop"], executor_tokens)
    assert dropped == {"type": "dropped", "name": NAME, "existed": True}
    assert_pages_free(engine)  # the export held its pages until the drop

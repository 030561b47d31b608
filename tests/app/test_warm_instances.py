"""`pie serve --warm-instances`: requests served by default-inferlet instances started ahead answer exactly as
cold ones, and leave no page behind."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from pie_server.engine.runtime.messages import Event, Terminated
from tests.app.conftest import start_real
from tests.app.server_thread import ServerThread
from tests.polling import wait_until

MODEL = "default"
NUM_WARM = 2


@pytest.fixture(scope="module")
def servers(tiny_llama_dir: Path, default_inferlet_wasm: Path,
            pie_cache_dir: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    warm = start_real(tiny_llama_dir, default_inferlet_wasm, pie_cache_dir, num_pages=64, warm_instances=NUM_WARM)
    cold = start_real(tiny_llama_dir, default_inferlet_wasm, pie_cache_dir, num_pages=64)
    yield warm, cold
    warm.__exit__(None, None, None)
    cold.__exit__(None, None, None)


def _answers(server: ServerThread, before_each: Callable[[], None]) -> list[Any]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    asks: list[Callable[[], Any]] = [
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                               max_tokens=8, temperature=0).choices[0].message.content,
        lambda: "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8, temperature=0,
            stream=True) if chunk.choices),
        lambda: [(c.text, c.logprobs.token_logprobs) for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, n=2, logprobs=2,
            extra_body={"ignore_eos": True}).choices],
    ]
    answers = []
    for ask in asks:
        before_each()
        answers.append(ask())
    return answers


def test_requests_on_warm_instances_answer_as_cold_ones_and_free_their_pages(servers) -> None:
    warm, cold = servers
    runtime = warm.engine.runtime  # type: ignore[attr-defined]
    program = warm.state.program_hash  # type: ignore[attr-defined]

    def parked() -> None:
        wait_until(lambda: runtime.warm.num_parked(program) == NUM_WARM)

    warm_answers = _answers(warm, parked)
    assert runtime.warm.num_taken == 3  # every request took a warm instance
    assert cold.engine.runtime.warm.num_taken == 0  # type: ignore[attr-defined]
    assert warm_answers == _answers(cold, lambda: None)
    parked()
    stats = warm.engine.control.stats()  # type: ignore[attr-defined]
    assert stats.num_instances == NUM_WARM  # the parked ones: opened in the control layer, holding nothing
    assert stats.num_free_pages == stats.num_pages  # (pages the prefix cache keeps count as free)


def test_the_default_inferlets_prepare_runs_cleanly_in_a_warm_instance(servers) -> None:
    """prepare() failing would only print to the instance's log (pie_sdk ignores it): a launch taking a warm
    instance must leave nothing there."""
    warm, _ = servers
    runtime = warm.engine.runtime  # type: ignore[attr-defined]
    program = warm.state.program_hash  # type: ignore[attr-defined]
    wait_until(lambda: runtime.warm.num_parked(program) == NUM_WARM)
    taken = runtime.warm.num_taken
    request = {"version": 1, "n": 1, "max_tokens": 2, "stop": [], "stop_token_ids": [], "ignore_eos": True,
               "constraint": None, "stream": False, "skip_special_tokens": True, "spaces_between_special_tokens": True,
               "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                            "logit_bias": [], "num_logprobs": None},
               "prompts": [{"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True}]}
    handle = runtime.launch(program, [json.dumps(request)])
    prompt = handle.get_message(timeout=30)
    assert isinstance(prompt, Event) and json.loads(prompt.json)["type"] == "prompt"
    handle.send("go")
    assert handle.messages(timeout=30)[-1] == Terminated(ok=True)
    assert runtime.warm.num_taken == taken + 1
    assert handle.log_text() == ""

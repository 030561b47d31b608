"""react-agent end to end: the componentize-py build on the real runtime, control layer and executor (tiny random
Llama with the default model's tokenizer, CPU), calling a tool server on loopback over the inferlet's HTTP.

Its defining behaviour: the tool calls really happen (the server counts them, with the inputs the model wrote), and
the context is never re-prefilled between steps: the executor computes each token's KV exactly once."""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest

from pie_server.app.inferlet_build import default_cache_dir
from pie_server.engine.config import EngineConfig
from pie_server.engine.engine import Engine
from pie_server.engine.grammar import GrammarCompiler
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.inferlets import CONTRIB_DIR
from tests.inferlets.contrib.conftest import PAGE_SIZE, Builder, assert_pages_free, events, ok, run
from tests.inferlets.loopback import LoopbackServer

NUM_CALLS = 3

pytestmark = pytest.mark.timeout(600)
INFERLETS = ("react-agent",)  # built in the background (conftest.py)
REACT_AGENT_DIR = CONTRIB_DIR / "react-agent"


class ToolServer:
    """POST /NAME with a text body -> "result N: <the body reversed>" after latency_s; records every call and
    when it was served (perf_counter seconds, from the request read to the reply)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.replies: list[str] = []
        self.windows: list[tuple[float, float]] = []
        self.latency_s = 0.0
        self.server = LoopbackServer(self._reply)
        self.url = self.server.url

    def _reply(self, name: str, body: str) -> str:
        started = time.perf_counter()
        time.sleep(self.latency_s)
        self.windows.append((started, time.perf_counter()))
        reply = f"result {len(self.calls) + 1}: {body[::-1]}"
        self.calls.append((name, body))
        self.replies.append(reply)
        return reply


@pytest.fixture(scope="module")
def tools() -> Iterator[ToolServer]:
    server = ToolServer()
    yield server
    server.server.close()


@pytest.fixture(scope="module")
def agent_engine(tiny_llama_dir: Path, build: Builder) -> Iterator[Engine]:
    """The shared engine's set-up, but its HTTP allow-list admits the loopback tool server."""
    build.start("react-agent")  # builds while the engine starts
    config = EngineConfig(device="cpu", dtype="float32", page_size=PAGE_SIZE, num_pages=96)
    runtime_config = RuntimeConfig(cache_dir=str(default_cache_dir().parent / "compiled"),
                                   http_allowed_hosts=("127.0.0.1",))
    started = Engine.start(tiny_llama_dir, config, runtime_config=runtime_config, progress=False)
    yield started
    started.close()


@pytest.fixture(scope="module")
def program(agent_engine: Engine, build: Builder) -> str:
    return build("react-agent", engine=agent_engine)


def _count_executor_tokens(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                           submitted: list[tuple[float, int]] | None = None) -> list[int]:
    """[tokens of every forward command the executor ran since], counted as it submits steps; each step's
    (perf_counter time, tokens) is appended to `submitted` if given."""
    count = [0]
    submit = engine.executor.submit

    def counted(batch):  # noqa: ANN001, ANN202
        num_tokens = sum(len(command.token_ids) for command in batch.forwards)
        count[0] += num_tokens
        if submitted is not None:
            submitted.append((time.perf_counter(), num_tokens))
        return submit(batch)

    monkeypatch.setattr(engine.executor, "submit", counted)
    return count


@pytest.mark.parametrize("options", [["--action-format", "template"],
                                     ["--action-format", "template", "--uniform-values"],
                                     ["--action-format", "json"]], ids=["template", "template-uniform", "json"])
def test_the_agent_calls_its_tools_and_never_prefills_the_conversation_again(
        agent_engine: Engine, program: str, tools: ToolServer, monkeypatch: pytest.MonkeyPatch,
        options: list[str]) -> None:
    engine = agent_engine
    executor_tokens = _count_executor_tokens(engine, monkeypatch)
    tools.calls.clear()
    tools.replies.clear()
    args = [*options, "--question", "What is the capital of France?", "--tool-url", tools.url,
            "--tool", "search: looks a fact up", "--tool", "calculate: evaluates arithmetic",
            "--min-calls", str(NUM_CALLS), "--max-calls", str(NUM_CALLS), "--thought-chars", "8",
            "--input-chars", "12"]
    messages = run(engine, program, args)
    ok(messages)
    *steps, answer = events(messages)
    # Every action the model wrote reached the tool server, in order, and its reply came back as the observation.
    assert len(tools.calls) == NUM_CALLS == len(steps) == answer["num_calls"]
    assert [(s["tool"], s["input"]) for s in steps] == tools.calls
    assert all(s["tool"] in ("search", "calculate") and len(s["input"]) <= 12 for s in steps)
    if "--uniform-values" in options:
        assert all(re.fullmatch("[a-z ]{12}", s["input"]) and re.fullmatch("[a-z ]{8}", s["thought"]) for s in steps)
    assert [s["observation"] for s in steps] == [" ".join(r.split()) for r in tools.replies]
    assert answer["type"] == "answer" and answer["num_steps"] == NUM_CALLS + 1 and len(answer["answer"]) <= 12
    # The KV stays in the server: the executor computed each token of the final context once (the cached
    # prefix not at all). A loop that sent the conversation again each step would have computed far more.
    assert executor_tokens[0] == answer["kv_len"] - answer["num_cached_tokens"]
    assert answer["num_prefilled_tokens"] + answer["num_generated_tokens"] - answer["num_generate_calls"] == \
        answer["kv_len"] - answer["num_cached_tokens"]
    assert answer["num_pages"] == -(-answer["kv_len"] // PAGE_SIZE)
    assert_pages_free(engine)


def test_the_agent_prefills_while_its_tool_works(agent_engine: Engine, program: str, tools: ToolServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The action's end and the observation turn's head do not wait for the tool's answer: the engine computes
    them while the request is in flight (an OpenAI client's server would be idle then)."""
    submitted: list[tuple[float, int]] = []
    _count_executor_tokens(agent_engine, monkeypatch, submitted)
    tools.windows.clear()
    monkeypatch.setattr(tools, "latency_s", 0.5)
    args = ["--question", "What is the capital of France?", "--tool-url", tools.url, "--tool", "search: looks up",
            "--min-calls", "2", "--max-calls", "2", "--thought-chars", "0", "--input-chars", "8"]
    messages = run(agent_engine, program, args)
    ok(messages)
    assert len(tools.windows) == 2
    for _, replied in tools.windows:
        # The last forward before the reply is the turn's fixed text (the value's last token, <|im_end|>, the
        # user turn's head, "Observation:": ~10 tokens), not the action's last decode step (1 token).
        [*_, (_, num_tokens)] = [step for step in submitted if step[0] < replied]
        assert num_tokens >= 5, (submitted, tools.windows)
    assert_pages_free(agent_engine)


def test_a_grammar_is_compiled_once_for_the_runtime_and_the_control_layer(
        agent_engine: Engine, program: str, tools: ToolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process the runtime (which checks a generate call's grammar) and the control layer (which decodes
    under it) share one compiler and its cache."""
    compiled: list[str] = []
    compile_grammar = GrammarCompiler._compile
    monkeypatch.setattr(GrammarCompiler, "_compile",
                        lambda self, text: compiled.append(text) or compile_grammar(self, text))
    args = ["--action-format", "template", "--uniform-values", "--question", "Which grammar?", "--tool-url",
            tools.url, "--tool", "search: looks a fact up", "--min-calls", "2", "--max-calls", "2",
            "--thought-chars", "0", "--input-chars", "11"]  # one grammar, [a-z ]{11}, new to this engine
    ok(run(agent_engine, program, args))
    assert len(compiled) == 1


# -- the transcript in plain CPython against the fake host (tests/inferlets/fake_host.py) --------------------------

@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    from tests.inferlets.fake_host import load_sdk

    return load_sdk(tmp_path_factory.mktemp("bindings"))


def _transcript_class(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch, render: Callable[[list[dict]], str]
                      ) -> tuple[type, list[int]]:
    """react-agent's Transcript over the fake host whose chat template is `render`; also [renders so far]."""
    from tests.inferlets.fake_host import FakeHost

    FakeHost().install(monkeypatch)
    sdk.model_info.cache_clear()
    num_renders = [0]

    def apply_chat_template(messages_json: str, tools_json: str | None, add_generation_prompt: bool) -> str:
        num_renders[0] += 1
        return render(json.loads(messages_json)) + ("<assistant>" if add_generation_prompt else "")

    monkeypatch.setattr(importlib.import_module("wit_world.imports.tokenize"), "apply_chat_template",
                        apply_chat_template)
    spec = importlib.util.spec_from_file_location("react_agent_transcript", REACT_AGENT_DIR / "transcript.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Transcript, num_renders


def _act_and_observe(transcript: Any, step: int) -> None:
    action = '{"tool": "search", "input": "step %d"}' % step
    transcript.write(action)
    transcript.end_turn(action)
    transcript.open_user_turn("Observation:")
    transcript.add_user_turn(f"Observation: found {step * 7}")


def _plain(messages: list[dict]) -> str:
    return "".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages)


@pytest.mark.parametrize("render, splices", [
    (_plain, True),
    # a template that rewrites a turn's content: the head and tail of the open turn cannot be trusted
    (lambda messages: "".join(f"<{m['role']}>{m['content'].replace('found', 'FOUND')}\n" for m in messages), False)],
    ids=["content-in-place", "content-rewritten"])
def test_each_turn_renders_the_conversation_once_and_the_context_is_the_templates_rendering(
        sdk: ModuleType, monkeypatch: pytest.MonkeyPatch, render: Callable[[list[dict]], str], splices: bool) -> None:
    """After the first observation turn (rendered twice: the open turn's head and tail, then the whole turn, to
    check that writing the content between them is what the template renders), one rendering per turn, made
    while the tool works. The context's text is the template's rendering of the conversation at every step."""
    transcript_class, num_renders = _transcript_class(sdk, monkeypatch, render)
    transcript = transcript_class([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    for step in range(1, 5):
        renders_before = num_renders[0]
        _act_and_observe(transcript, step)
        assert transcript.text == render(transcript.messages) + "<assistant>"
        assert num_renders[0] - renders_before == (1 if splices and step > 1 else 2)
    assert transcript.templated

"""SDK-built inferlets end to end: componentize-py components on the real runtime, control layer and executor
(tiny random Llama with the default model's tokenizer, CPU). Each component is built once per session
(in parallel) and compiled once per session (the runtime's artifact cache)."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from pie_server.app.commands.run import run_instance
from pie_server.app.inferlet_build import build_inferlet, default_cache_dir
from pie_server.engine.config import EngineConfig
from pie_server.engine.engine import Engine
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.loader import load_model_config, load_weights
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.engine.runtime.messages import Event, Message, Terminated, Text
from pie_server.inferlets import CONTRIB_DIR
from tests.inferlets.loopback import LoopbackServer

SOURCES = {"text-completion": CONTRIB_DIR / "text-completion",
           "probe": Path(__file__).resolve().parent / "probe"}
PAGE_SIZE = 16
NUM_PAGES = 96
PROMPT = "The capital of France is"
LONG_PROMPT = ("Once upon a time, in a land far away, there lived a curious fox who loved to read old maps, "
               "count the stars over the hills, and ask the wise owl of the northern forest about rivers, "
               "mountains, distant cities and the long winding roads between them.")  # 2 pages and a bit
TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def components(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Path]]]:
    """The builds start here and run in the background (componentize-py subprocesses) while the engine
    loads; `programs` waits for them."""
    out_dir = tmp_path_factory.mktemp("components")
    with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
        yield {name: pool.submit(build_inferlet, src, out_dir / f"{name}.wasm") for name, src in SOURCES.items()}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[Engine]:
    config = EngineConfig(device="cpu", dtype="float32", page_size=PAGE_SIZE, num_pages=NUM_PAGES)
    runtime_config = RuntimeConfig(cache_dir=str(default_cache_dir().parent / "compiled"),  # shared per session
                                   http_allowed_hosts=("127.0.0.1",))
    started = Engine.start(tiny_llama_dir, config, runtime_config=runtime_config, progress=False)
    yield started
    started.close()


@pytest.fixture(scope="module")
def programs(components: dict[str, Future[Path]], engine: Engine) -> dict[str, str]:
    return {name: engine.runtime.load(built.result().read_bytes()) for name, built in components.items()}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> DirectGenerator:
    """The executor driven directly (its own KV pool): the ground truth for greedy outputs."""
    executor = Executor(load_model_config(tiny_llama_dir), EngineConfig(page_size=PAGE_SIZE, num_pages=64),
                        load_weights(tiny_llama_dir, torch.float32, progress=False))
    return DirectGenerator(executor)


@pytest.fixture(autouse=True)
def all_pages_free_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        engine: Engine = request.getfixturevalue("engine")
        engine.control.clear_prefix_cache()
        stats = engine.control.stats()
        assert (stats.num_free_pages, stats.num_instances) == (stats.num_pages, 0)


def _greedy(reference: DirectGenerator, engine: Engine, prompt: str, num_tokens: int) -> list[int]:
    return reference.generate([engine.tokenizer.encode(prompt)], num_tokens)[0]


def _messages(engine: Engine, program: str, args: list[str], inputs: tuple[str, ...] = ()) -> list[Message]:
    handle = engine.runtime.launch(program, args)
    for message in inputs:
        handle.send(message)
    return handle.messages(TIMEOUT_S)


def _events(messages: list[Message]) -> list[dict[str, Any]]:
    return [json.loads(m.json) for m in messages if isinstance(m, Event)]


def _ok(messages: list[Message]) -> None:
    end = messages[-1]
    assert isinstance(end, Terminated) and end.ok, end


def test_text_completion_equals_the_executors_greedy_output(engine: Engine, programs: dict[str, str],
                                                             reference: DirectGenerator) -> None:
    messages = _messages(engine, programs["text-completion"], ["--prompt", PROMPT, "--max-tokens", "16"])
    _ok(messages)
    expected = _greedy(reference, engine, PROMPT, 16)
    eos = [i for i, t in enumerate(expected) if t in engine.tokenizer.eos_token_ids]
    expected = expected[:eos[0]] if eos else expected
    streamed = [m.text for m in messages if isinstance(m, Text)]
    assert len(streamed) > 1  # it streams as it decodes, not all at the end
    assert "".join(streamed) == engine.tokenizer.decode(expected)


def test_every_sdk_decode_path_gives_the_same_tokens(engine: Engine, programs: dict[str, str],
                                                     reference: DirectGenerator) -> None:
    messages = _messages(engine, programs["probe"], ["paths", "--prompt", PROMPT, "--max-tokens", "10"])
    _ok(messages)
    [report] = _events(messages)
    expected = _greedy(reference, engine, PROMPT, 10)
    for path in ("generate", "stepwise", "decode_step", "distribution"):
        assert report[path] == expected, path
    assert report["text"] == report["stepwise_text"] == engine.tokenizer.decode(expected)


def test_fork_shares_full_pages(engine: Engine, programs: dict[str, str], reference: DirectGenerator) -> None:
    num_forks = 3
    handle = engine.runtime.launch(programs["probe"], ["fork", "--prompt", LONG_PROMPT, "--max-tokens", "6",
                                                       "--forks", str(num_forks)])
    try:
        first = handle.get_message(TIMEOUT_S)
        assert isinstance(first, Event), first
        forked = json.loads(first.json)
        num_full, num_partial = divmod(forked["kv_len"], PAGE_SIZE)
        assert num_full >= 2 and num_partial > 0  # the prompt spans shared pages and a partial one
        stats = engine.control.stats()
        used = stats.num_pages - stats.num_free_pages
        # Shared full pages count once; each fork adds only its copy of the partial last page.
        assert forked["pages"] == [num_full + 1] * (num_forks + 1)
        assert used == num_full + 1 + num_forks < (num_full + 1) * (num_forks + 1)
    finally:
        handle.send("go")
    rest = handle.messages(TIMEOUT_S)
    _ok(rest)
    [generated] = _events(rest)
    expected = _greedy(reference, engine, LONG_PROMPT, 6)
    assert generated["token_ids"] == [expected] * (num_forks + 1)


def test_prefix_cache_reuse_gives_the_same_text(engine: Engine, programs: dict[str, str]) -> None:
    messages = _messages(engine, programs["probe"], ["prefix", "--prompt", LONG_PROMPT, "--max-tokens", "5"])
    _ok(messages)
    [report] = _events(messages)
    num_prompt = len(engine.tokenizer.encode(LONG_PROMPT))
    assert report["published"] >= PAGE_SIZE * 2
    assert report["cached"] == (num_prompt // PAGE_SIZE) * PAGE_SIZE and report["cached"] > 0
    assert report["again"] == report["text"]


def test_an_imported_context_continues_like_one_that_prefilled_itself(
        engine: Engine, programs: dict[str, str], reference: DirectGenerator) -> None:
    exporter = engine.runtime.launch(programs["probe"], ["export", "--prompt", LONG_PROMPT, "--name", "story"])
    first = exporter.get_message(TIMEOUT_S)
    assert isinstance(first, Event), first
    exported = json.loads(first.json)["exported"]
    messages = _messages(engine, programs["probe"], ["import", "--name", "story", "--max-tokens", "6"])
    exporter.send("done")
    _ok(exporter.messages(TIMEOUT_S))
    _ok(messages)
    [report] = _events(messages)
    assert report["reused"] == exported >= PAGE_SIZE
    assert report["text"] == engine.tokenizer.decode(_greedy(reference, engine, LONG_PROMPT, 6))


def test_grammar_constraints_shape_the_output(engine: Engine, programs: dict[str, str]) -> None:
    messages = _messages(engine, programs["probe"], ["constrained", "--prompt", PROMPT])
    _ok(messages)
    [report] = _events(messages)
    assert re.fullmatch(r"[0-9]{3}", report["number"]) and report["number_finish"] == "stop"
    assert json.loads(report["json"]) in ({"ok": True}, {"ok": False}), report


def test_errors_end_only_with_a_clear_message(engine: Engine, programs: dict[str, str]) -> None:
    failed = _messages(engine, programs["probe"], ["fail"])
    end = failed[-1]
    assert isinstance(end, Terminated) and not end.ok and "ValueError: probe failure" in (end.error or "")
    usage = _messages(engine, programs["text-completion"], ["--max-tokens", "3"])[-1]
    assert isinstance(usage, Terminated) and not usage.ok
    assert "the following arguments are required: --prompt" in (usage.error or "")
    bad = _messages(engine, programs["probe"], ["bad-page", "--prompt", PROMPT])
    _ok(bad)  # a refused call is an error value to the inferlet, not the end of it
    [report] = _events(bad)
    assert report["error"] and "987654" in report["error"]
    assert "out of range" in report["value_error"] and report["text"]


class GatheringServer:
    """POST /N -> "reply N" once `expected` requests are open at the same time, or after wait_s; records the
    most requests it held at once. Fetches started together all return as soon as the last one arrives, however
    loaded the machine is; fetches made one after the other each wait wait_s and never overlap."""

    def __init__(self, expected: int, wait_s: float) -> None:
        self.expected, self.wait_s = expected, wait_s
        self.num_open = self.max_open = 0
        self._changed = threading.Condition()
        self.server = LoopbackServer(self._reply)

    def _reply(self, name: str, body: str) -> str:
        with self._changed:
            self.num_open += 1
            self.max_open = max(self.max_open, self.num_open)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.max_open >= self.expected, self.wait_s)
            self.num_open -= 1
        return f"reply {name}"


def test_started_fetches_run_at_once_up_to_the_instances_limit(engine: Engine, programs: dict[str, str]) -> None:
    limit = RuntimeConfig().http_max_pending_per_instance
    server = GatheringServer(expected=limit, wait_s=2.0)
    try:
        messages = _messages(engine, programs["probe"], ["fetch", "--url", server.server.url, "--count",
                                                         str(limit + 1)])
    finally:
        server.server.close()
    _ok(messages)  # ended with a fetch in flight that it never waited for: a normal end
    [report] = _events(messages)
    assert report["bodies"] == [f"reply {i}" for i in range(limit)]
    assert report["refused"] == [f"{limit} fetches are already in flight for this instance (fetch-wait for one "
                                 "first)"]
    assert server.max_open == limit  # all in flight together: started, not fetched one after the other
    assert "no fetch 1 is in flight" in report["again"] and "no fetch 987654 is in flight" in report["unknown"]


def test_pie_run_prints_the_stream_and_reports_failures(engine: Engine, programs: dict[str, str],
                                                        reference: DirectGenerator) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = run_instance(engine, programs["text-completion"], ["--prompt", PROMPT, "--max-tokens", "8"], [],
                          TIMEOUT_S, out, err)
    expected = _greedy(reference, engine, PROMPT, 8)
    assert status == 0 and out.getvalue() == engine.tokenizer.decode(expected) + "\n"
    out, err = io.StringIO(), io.StringIO()
    assert run_instance(engine, programs["probe"], ["fail"], [], TIMEOUT_S, out, err) == 1
    assert "the inferlet failed" in err.getvalue() and "probe failure" in err.getvalue()
    assert "--- inferlet output ---\nprobe: about to fail" in err.getvalue()  # the guest's print()


def test_pie_run_command_end_to_end(engine: Engine, programs: dict[str, str], components: dict[str, Future[Path]],
                                    tiny_llama_dir: Path, reference: DirectGenerator) -> None:
    """`pie run` in a subprocess (its own engine; the compiled component comes from the session's cache)."""
    wasm = components["text-completion"].result()
    pie = Path(sys.executable).with_name("pie")  # the installed console script, as a user runs it
    command = [str(pie), "run", str(wasm), "--model", str(tiny_llama_dir), "--device", "cpu",
               "--num-pages", "32", "--", "--prompt", PROMPT, "--max-tokens", "6"]
    done = subprocess.run(command, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout == engine.tokenizer.decode(_greedy(reference, engine, PROMPT, 6)) + "\n"
    failed = subprocess.run(command[:-2] + ["--max-tokens", "0"], cwd=tempfile.gettempdir(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert failed.returncode == 1 and "--max-tokens must be at least 1" in failed.stderr


def test_the_start_up_heap_is_frozen_so_collections_do_not_walk_it(engine: Engine, programs: dict[str, str]) -> None:
    """pie_sdk.export freezes the heap that the component's snapshot holds: an instance's collections walk only
    the objects it made itself, never write into the pages of its copy-on-write start-up image."""
    messages = _messages(engine, programs["probe"], ["heap"])
    _ok(messages)
    [report] = _events(messages)
    assert report["frozen"] > 10 * report["tracked"] > 0, report
    assert report["frozen_after_collect"] == report["frozen"]

"""Shared fixtures of the contributed inferlets' tests (inferlets/contrib/NAME, one test module each).

- `engine`: one engine per session on the tiny random Llama (CPU, float32, pages of PAGE_SIZE slots): fast;
  its distributions are nearly flat, so it shows mechanics (pages, batching, equality with a reference).
- `real_engine`: one engine per session on the default model (SmolLM2-135M-Instruct) for behaviour only a
  real language model shows (it continues a repetition, it has confident tokens).
- `build(name, engine=None)`: the program hash of inferlets/contrib/NAME loaded into `engine` (default: the
  tiny one). Each component is built once per session (componentize-py, cached by source hash), compiled
  once per engine. A test module that lists its inferlets in a module-level `INFERLETS = ("name", ...)` has
  them built in the background from the session's first test here on, two at a time, overlapping with the
  other modules' tests (`build.start(*names)` does the same by hand).
Helpers for the tests: `run(engine, program, args, inputs=())` -> messages, `events(messages)`,
`ok(messages)`, `assert_pages_free(engine)`.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from pie_server.app.inferlet_build import build_inferlet, default_cache_dir
from pie_server.engine.config import EngineConfig
from pie_server.engine.engine import Engine
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.engine.runtime.messages import Event, Message, Terminated
from pie_server.inferlets import CONTRIB_DIR

PAGE_SIZE = 16
NUM_PAGES = 256
TIMEOUT_S = 180.0


class Builder:
    """Components of inferlets/contrib built in the background (two at a time: CPU-bound subprocesses)."""

    def __init__(self, out_dir: Path, pool: ThreadPoolExecutor, engine_of: Any) -> None:
        self._out_dir = out_dir
        self._pool = pool
        self._engine_of = engine_of  # () -> the default engine, started on first use
        self._builds: dict[str, Future[Path]] = {}
        self._loaded: dict[tuple[int, str], str] = {}

    def start(self, *names: str) -> None:
        for name in names:
            if name not in self._builds:
                self._builds[name] = self._pool.submit(build_inferlet, CONTRIB_DIR / name,
                                                       self._out_dir / f"{name}.wasm", progress=False)

    def wasm(self, name: str) -> Path:
        self.start(name)
        return self._builds[name].result()

    def __call__(self, name: str, engine: Engine | None = None) -> str:
        engine = engine if engine is not None else self._engine_of()
        key = (id(engine), name)
        if key not in self._loaded:
            self._loaded[key] = engine.runtime.load(self.wasm(name).read_bytes())
        return self._loaded[key]


def _start_engine(model_dir: Path) -> Engine:
    config = EngineConfig(device="cpu", dtype="float32", page_size=PAGE_SIZE, num_pages=NUM_PAGES)
    runtime_config = RuntimeConfig(cache_dir=str(default_cache_dir().parent / "compiled"))  # shared per session
    return Engine.start(model_dir, config, runtime_config=runtime_config, progress=False)


@pytest.fixture(scope="session")
def engine(tiny_llama_dir: Path) -> Iterator[Engine]:
    started = _start_engine(tiny_llama_dir)
    yield started
    started.close()


@pytest.fixture(scope="session")
def real_engine(default_model_dir: Path) -> Iterator[Engine]:
    started = _start_engine(default_model_dir)
    yield started
    started.close()


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Builder]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield Builder(tmp_path_factory.mktemp("contrib-components"), pool,
                      lambda: request.getfixturevalue("engine"))


@pytest.fixture(scope="session", autouse=True)
def prefetch_builds(build: Builder, request: pytest.FixtureRequest) -> None:
    names = [name for item in request.session.items for name in getattr(item.module, "INFERLETS", ())]
    build.start(*dict.fromkeys(names))


def run(engine: Engine, program: str, args: Sequence[str], inputs: Sequence[str] = ()) -> list[Message]:
    """Launch, send the inputs, and collect every message until the instance ends."""
    handle = engine.runtime.launch(program, list(args))
    for message in inputs:
        handle.send(message)
    return handle.messages(TIMEOUT_S)


def events(messages: list[Message]) -> list[dict[str, Any]]:
    return [json.loads(m.json) for m in messages if isinstance(m, Event)]


def ok(messages: list[Message]) -> None:
    end = messages[-1]
    assert isinstance(end, Terminated) and end.ok, end


def assert_pages_free(engine: Engine) -> None:
    """No instance left and every page back in the pool (after dropping the prefix cache's references)."""
    engine.control.clear_prefix_cache()
    stats = engine.control.stats()
    assert (stats.num_free_pages, stats.num_instances) == (stats.num_pages, 0)

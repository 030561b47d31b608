"""Fixtures: a real uvicorn server on a loopback port serving the app over a fake engine."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from pie_server.app.config import ServerConfig
from pie_server.app.server import create_app
from tests.app import raw_http
from tests.app.fake_engine import FakeEngine
from tests.app.server_thread import ServerThread


@pytest.fixture(scope="session")
def dummy_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wasm") / "default.wasm"
    path.write_bytes(b"\0asm-fake")
    return path


def start_fake(dummy_wasm: Path, engine: FakeEngine, **config: Any) -> ServerThread:
    config.setdefault("inferlet_dir", Path(tempfile.mkdtemp(prefix="pie-uploads-")))  # its own, as a deployment's
    app = create_app(lambda: engine, ServerConfig(inferlet_wasm=dummy_wasm, **config))
    server = ServerThread(app).__enter__()
    server.engine = engine  # type: ignore[attr-defined]
    server.state = app.state.pie  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="module")
def fake_server(dummy_wasm: Path) -> Iterator[ServerThread]:
    server = start_fake(dummy_wasm, FakeEngine())
    wait_ready(server)
    yield server
    server.__exit__(None, None, None)


@pytest.fixture()
def make_fake_server(dummy_wasm: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def make(engine: FakeEngine | None = None, **config: Any) -> ServerThread:
        server = start_fake(dummy_wasm, engine or FakeEngine(), **config)
        servers.append(server)
        wait_ready(server)
        return server

    yield make
    for server in servers:
        server.__exit__(None, None, None)


def wait_ready(server: ServerThread, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if raw_http.request(server.url + "/health")[0] == 200:
            return
        time.sleep(0.02)
    raise RuntimeError("the server did not become ready")


def client_for(server: ServerThread, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                         **kwargs)


# -- the real engine (default model) and the default inferlet built from source -------------------------

@pytest.fixture(scope="session")
def default_inferlet_wasm(pie_cache_dir: Path) -> Path:
    """inferlets/builtin/default built once per session (componentize-py, ~10-30 s)."""
    from pie_server.app.config import DEFAULT_INFERLET_SOURCE
    from pie_server.app.inferlet_build import build_inferlet

    return build_inferlet(DEFAULT_INFERLET_SOURCE, pie_cache_dir / "default-inferlet.wasm")


MODEL_NAME = "default"


def start_real(model_dir: Path, wasm: Path, cache_dir: Path, num_pages: int, **config: Any) -> ServerThread:
    from pie_server.engine.config import EngineConfig
    from pie_server.engine.engine import Engine
    from pie_server.engine.runtime.config import RuntimeConfig

    engines: list[Engine] = []

    def factory() -> Engine:
        engines.append(Engine.start(model_dir, EngineConfig(num_pages=num_pages), model_name=MODEL_NAME,
                                    runtime_config=RuntimeConfig(cache_dir=str(cache_dir / "compiled")),
                                    progress=False))
        return engines[-1]

    config.setdefault("inferlet_dir", Path(tempfile.mkdtemp(prefix="pie-uploads-")))
    app = create_app(factory, ServerConfig(inferlet_wasm=wasm, **config))
    server = ServerThread(app).__enter__()
    wait_ready(server, timeout_s=600)
    server.engine = engines[0]  # type: ignore[attr-defined]
    server.state = app.state.pie  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="session")
def real_server(default_model_dir: Path, default_inferlet_wasm: Path, pie_cache_dir: Path) -> Iterator[ServerThread]:
    """The app over SmolLM2-135M-Instruct and the Wasm default inferlet (256 pages of 16 tokens)."""
    server = start_real(default_model_dir, default_inferlet_wasm, pie_cache_dir, num_pages=256)
    yield server
    server.__exit__(None, None, None)


def all_pages_free(server: ServerThread, timeout_s: float = 10.0) -> bool:
    """Every KV page free (or held only by the prefix cache) and no instance left, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = server.engine.control.stats()  # type: ignore[attr-defined]
        if stats.num_free_pages == stats.num_pages and stats.num_instances == 0:
            return True
        time.sleep(0.02)
    return False

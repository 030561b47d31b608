"""Fixtures: a real uvicorn server on a loopback port serving the app over a fake engine."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from app.config import ServerConfig
from app.server import create_app
from tests.app import raw_http
from tests.app.fake_engine import FakeEngine
from tests.app.server_thread import ServerThread


@pytest.fixture(scope="session")
def dummy_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wasm") / "default.wasm"
    path.write_bytes(b"\0asm-fake")
    return path


def start_fake(dummy_wasm: Path, engine: FakeEngine, **config: Any) -> ServerThread:
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

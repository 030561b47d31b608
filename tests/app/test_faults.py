"""Faults (issue 14): the executor raising in the middle of a batch fails that batch's requests with a clear error
while the server keeps serving; `pie serve --api-processes 1` restarts an engine core that died, its waiting
requests getting errors instead of hanging."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.app import raw_http
from tests.app.conftest import all_pages_free, start_real
from tests.app.serve_process import ServeProcess, healthy_server
from tests.app.server_thread import ServerThread
from tests.polling import wait_until

CHAT = "/v1/chat/completions"


def _chat(max_tokens: int, stream: bool = False, content: str = "Hello there") -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def one_slot_server(tiny_llama_dir: Path, default_inferlet_wasm: Path, pie_cache_dir: Path) -> Iterator[ServerThread]:
    """The tiny model in process, one request running at a time (the others wait for the slot, in no batch)."""
    server = start_real(tiny_llama_dir, default_inferlet_wasm, pie_cache_dir, num_pages=64, max_running_requests=1)
    yield server
    server.__exit__(None, None, None)


class FaultyExecute:
    """Wraps the executor's execute: once armed, the next step raises (once), as a device error would."""

    def __init__(self, executor: Any) -> None:
        self.executor, self.inner = executor, executor.execute
        self.armed = threading.Event()
        self.num_failed_sequences = 0

    def __call__(self, batch: Any) -> Any:
        if self.armed.is_set():
            self.armed.clear()
            raise RuntimeError("injected device fault")
        return self.inner(batch)

    def __enter__(self) -> "FaultyExecute":
        self.executor.execute = self
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.executor.execute  # the class's method again


def test_an_executor_fault_fails_only_its_batch(one_slot_server: ServerThread) -> None:
    url = one_slot_server.url + CHAT
    expected = raw_http.request(url, "POST", _chat(12, content="Later"))[1]["choices"][0]["message"]["content"]
    with FaultyExecute(one_slot_server.engine.executor) as fault:  # type: ignore[attr-defined]
        outcome: dict[str, Any] = {}

        def waiting() -> None:  # queued for the one slot while the stream runs: in no batch
            outcome["later"] = raw_http.request(url, "POST", _chat(12, content="Later"), timeout=120)

        from http.client import HTTPConnection
        conn = HTTPConnection("127.0.0.1", one_slot_server.port, timeout=120)
        conn.request("POST", CHAT, json.dumps(_chat(400, stream=True)), {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline() + response.readline()  # one event: its data line and the blank line
        assert b"chat.completion.chunk" in first
        later = threading.Thread(target=waiting)
        later.start()
        wait_until(lambda: one_slot_server.state.num_queued >= 1)  # type: ignore[attr-defined]
        fault.armed.set()
        rest = response.read().decode()
        conn.close()
        later.join(120)
    events = [block[len("data: "):] for block in rest.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "the executor failed this step" in error["message"] and "injected device fault" in error["message"]
    assert error["type"] == "internal_server_error"
    status, body, _ = outcome["later"]
    assert status == 200 and body["choices"][0]["message"]["content"] == expected  # unaffected, same output
    assert raw_http.request(one_slot_server.url + "/health")[0] == 200
    assert all_pages_free(one_slot_server)


@pytest.fixture(scope="module")
def served_with_core(tiny_llama_dir: Path, default_inferlet_wasm: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`pie serve --api-processes 1`: one front end beside an engine-core process (tiny model)."""
    with healthy_server(["--model", str(tiny_llama_dir), "--num-pages", "256", "--api-processes", "1",
                         "--served-model-name", "default", "--default-inferlet", str(default_inferlet_wasm),
                         "--max-running-requests", "1"], tmp_path_factory.mktemp("serve") / "serve.log") as served:
        yield served


def test_a_dead_engine_core_fails_waiting_requests_and_is_restarted(served_with_core: ServeProcess) -> None:
    served = served_with_core
    url = served.url + CHAT
    expected = raw_http.request(url, "POST", _chat(8), timeout=60)[1]["choices"][0]["message"]["content"]
    [core_pid] = served.core_pids()
    outcomes: dict[str, Any] = {}

    def request(name: str, body: dict[str, Any]) -> None:
        try:
            outcomes[name] = raw_http.request(url, "POST", body, timeout=60)
        except OSError as exc:  # a hang would be a timeout here
            outcomes[name] = exc

    running = threading.Thread(target=request, args=("running", _chat(1900)))
    running.start()
    time.sleep(1.0)  # it runs (the one slot); the next waits for the slot
    waiting = threading.Thread(target=request, args=("waiting", _chat(8)))
    waiting.start()
    time.sleep(0.5)
    os.kill(core_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    statuses = set()
    while time.monotonic() - killed_at < 5 and 503 not in statuses:
        statuses.add(served.health())
        time.sleep(0.05)
    assert 503 in statuses, "/health did not answer 503 without the engine core"
    running.join(30)
    waiting.join(30)
    assert not running.is_alive() and not waiting.is_alive(), "requests hung on the dead engine core"
    for name in ("running", "waiting"):
        status, body, _ = outcomes[name]
        assert status in (500, 503) and body["error"]["message"], (name, status, body)
    served.wait_healthy(timeout_s=120)
    restarted_after_s = time.monotonic() - killed_at
    assert len(served.core_pids()) == 2 and served.core_pids()[1] != core_pid
    status, body, _ = raw_http.request(url, "POST", _chat(8), timeout=60)
    assert status == 200 and body["choices"][0]["message"]["content"] == expected
    print(f"engine core restarted and serving {restarted_after_s:.1f} s after SIGKILL")

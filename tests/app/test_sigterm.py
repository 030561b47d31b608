"""`pie serve` (default model) as a user runs it: a 20 MB body as the first chat request answers (issue 14's
hang), and SIGTERM drains, in one process and with two front-end processes: running streams complete, new requests
and /health get 503 meanwhile, then the process exits 0."""
from __future__ import annotations

import json
import signal
import time
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from typing import Iterator

import pytest

from tests.app import raw_http
from tests.app.serve_process import ServeProcess, healthy_server

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def served(default_model_dir: Path, default_inferlet_wasm: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with healthy_server(["--model", str(default_model_dir), "--served-model-name", "default", "--num-pages", "128",
                         "--default-inferlet", str(default_inferlet_wasm)],
                        tmp_path_factory.mktemp("serve") / "serve.log") as process:
        yield process


def test_a_20_mb_unknown_field_as_the_first_chat_request_answers(served: ServeProcess) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "unknown_field": "x" * (20 << 20)}
    started = time.monotonic()
    status, reply, _ = raw_http.request(served.url + CHAT, "POST", body, timeout=60)
    elapsed = time.monotonic() - started
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply
    assert elapsed < 30, f"{elapsed:.1f} s"
    print(f"20 MB body, first chat request: {elapsed:.2f} s")


def test_sigterm_drains_the_stream_in_flight_then_exits_0(served: ServeProcess) -> None:
    response = _start_stream(served)
    served.process.send_signal(signal.SIGTERM)
    _assert_draining(served)
    _assert_completes(response)
    assert served.process.wait(timeout=60) == 0, served.log()[-3000:]


def test_sigterm_with_two_front_ends_drains_every_stream_then_exits_0(
        default_model_dir: Path, default_inferlet_wasm: Path, tmp_path: Path) -> None:
    """--api-processes 2: uvicorn's manager with an engine-core process; the manager passes SIGTERM on to both
    front ends, each drains (app/commands/serve_drain.py serve_workers). Streams on 3 connections (the kernel
    spreads connections over the workers; the test does not rely on which worker serves which)."""
    with healthy_server(["--model", str(default_model_dir), "--served-model-name", "default", "--num-pages", "128",
                         "--default-inferlet", str(default_inferlet_wasm), "--api-processes", "2"],
                        tmp_path / "serve.log") as served:
        responses = [_start_stream(served) for _ in range(3)]
        served.process.send_signal(signal.SIGTERM)
        _assert_draining(served, num_front_ends=2)
        for response in responses:
            _assert_completes(response)
        assert served.process.wait(timeout=60) == 0, served.log()[-3000:]
        assert served.log().count("signal 15: draining") == 2, served.log()[-3000:]  # each front end drained


def _start_stream(served: ServeProcess) -> HTTPResponse:
    """A 48-token chat stream, once its first chunk came."""
    conn = HTTPConnection("127.0.0.1", served.port, timeout=120)
    conn.request("POST", CHAT, json.dumps({"model": "default", "messages": MESSAGES, "max_tokens": 48,
                                           "ignore_eos": True, "stream": True}), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert b"chat.completion.chunk" in response.readline()
    return response


def _assert_draining(served: ServeProcess, num_front_ends: int = 1) -> None:
    """Once every front end has begun its drain (uvicorn's manager passes the signal on within about 0.5 s),
    the server still runs, and a new chat and /health get 503."""
    deadline = time.monotonic() + 10
    while served.log().count("signal 15: draining") < num_front_ends and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.log().count("signal 15: draining") == num_front_ends, served.log()[-3000:]
    assert served.process.poll() is None
    status, body, _ = raw_http.request(served.url + CHAT, "POST", {"model": "default", "messages": MESSAGES,
                                                                   "max_tokens": 2}, timeout=10)
    assert status == 503 and body["error"]["type"] == "service_unavailable", body
    assert served.health() == 503


def _assert_completes(response: HTTPResponse) -> None:
    """Every chunk (the first was read) and [DONE], no error event."""
    rest = response.read().decode()
    response.close()
    chunks = [json.loads(b[len("data: "):]) for b in rest.split("\n\n") if b.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]") and not any("error" in c for c in chunks)
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) >= 40

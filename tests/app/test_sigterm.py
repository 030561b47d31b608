"""`pie serve` (default model, one process) as a user runs it: a 20 MB body as the first chat request answers
(issue 14's hang), and SIGTERM drains: a running stream completes, new requests and /health get 503 meanwhile,
then the process exits 0."""
from __future__ import annotations

import json
import signal
import time
from http.client import HTTPConnection
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
    conn = HTTPConnection("127.0.0.1", served.port, timeout=120)
    conn.request("POST", CHAT, json.dumps({"model": "default", "messages": MESSAGES, "max_tokens": 48,
                                           "ignore_eos": True, "stream": True}), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert b"chat.completion.chunk" in response.readline()
    served.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert served.process.poll() is None  # still draining
    status, body, _ = raw_http.request(served.url + CHAT, "POST", {"model": "default", "messages": MESSAGES,
                                                                   "max_tokens": 2}, timeout=10)
    assert status == 503 and body["error"]["type"] == "service_unavailable", body
    assert served.health() == 503
    rest = response.read().decode()
    conn.close()
    chunks = [json.loads(b[len("data: "):]) for b in rest.split("\n\n") if b.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]") and not any("error" in c for c in chunks)
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) >= 40
    assert served.process.wait(timeout=60) == 0, served.log()[-3000:]

"""/v1/inferlets and /v1/runs end to end: a real server over the default model, the contrib text-completion
inferlet uploaded as its Wasm bytes, run with and without streaming, listed, cancelled, deleted; and the limits
(size, name, unknown ids) over the fake engine."""
from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from tests.app import raw_http
from tests.app.conftest import all_pages_free

PROMPT_ARGS = ["--prompt", "The capital of France is", "--max-tokens", "8"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def text_completion_wasm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from pie_server.app.inferlet_build import build_inferlet
    from pie_server.inferlets import CONTRIB_DIR

    out = tmp_path_factory.mktemp("tc") / "text-completion.wasm"
    return build_inferlet(CONTRIB_DIR / "text-completion", out).read_bytes()


@pytest.fixture(scope="module")
def uploaded(real_server, text_completion_wasm: bytes) -> Iterator[dict]:
    status, body, _ = _upload(real_server.url, text_completion_wasm, "tc")
    assert status == 201, body
    yield body
    raw_http.request(real_server.url + "/v1/inferlets/" + body["id"], "DELETE")


def _upload(url: str, wasm: bytes, name: str) -> tuple[int, dict, dict]:
    return raw_http.request(f"{url}/v1/inferlets?name={name}", "POST", raw_body=wasm,
                            headers={"content-type": "application/wasm"}, timeout=300)


def test_upload_gives_the_sha256_and_the_same_bytes_the_same_id(real_server, text_completion_wasm, uploaded) -> None:
    assert uploaded["id"] == hashlib.sha256(text_completion_wasm).hexdigest()
    assert uploaded["object"] == "inferlet" and uploaded["size"] == len(text_completion_wasm)
    status, again, _ = _upload(real_server.url, text_completion_wasm, "tc")
    assert status == 201 and again["id"] == uploaded["id"]
    listed = raw_http.request(real_server.url + "/v1/inferlets")[1]["data"]
    assert [r["id"] for r in listed if r["name"] == "tc"] == [uploaded["id"]]
    for ref in ("tc", uploaded["id"]):
        assert raw_http.request(f"{real_server.url}/v1/inferlets/{ref}")[1]["id"] == uploaded["id"]


def _wat(text: str) -> bytes:
    import wasmtime

    return wasmtime.wat2wasm(text)


@pytest.mark.parametrize("wasm, says", [
    (b"Hello, I am not WebAssembly at all", "not a valid WebAssembly component"),
    (b"\0asm\x01\0\0\0not really", "a core WebAssembly module, not a component"),
    (_wat('(module (func (export "run")))'), "a core WebAssembly module, not a component"),
    (_wat("(component)"), "does not export the function `run`"),  # a component of another (empty) world
    (_wat('(component (import "acme:other/api" (instance)))'), "imports acme:other/api"),
], ids=["garbage", "broken-module", "core-module", "no-run-export", "foreign-import"])
def test_bytes_that_are_no_inferlet_component_get_400(real_server, wasm: bytes, says: str) -> None:
    status, body, _ = _upload(real_server.url, wasm, "junk")
    assert status == 400 and body["error"]["code"] == "invalid_inferlet" and says in body["error"]["message"]
    assert all(r["name"] != "junk" for r in raw_http.request(real_server.url + "/v1/inferlets")[1]["data"])


def test_a_run_without_streaming_returns_its_messages(real_server, uploaded) -> None:
    status, run, _ = raw_http.request(f"{real_server.url}/v1/inferlets/tc/runs", "POST", {"args": PROMPT_ARGS})
    assert status == 200 and run["status"] == "finished" and run["object"] == "run"
    assert "".join(run["messages"]).strip()
    again = raw_http.request(f"{real_server.url}/v1/inferlets/{uploaded['id']}/runs", "POST", {"args": PROMPT_ARGS})[1]
    assert again["messages"] == run["messages"]  # greedy
    assert raw_http.request(f"{real_server.url}/v1/runs/{run['id']}")[1]["messages"] == run["messages"]
    assert all_pages_free(real_server)


def test_a_streamed_run_sends_message_events_then_done(real_server, uploaded) -> None:
    whole = raw_http.request(f"{real_server.url}/v1/inferlets/tc/runs", "POST", {"args": PROMPT_ARGS})[1]
    events, headers = _sse(real_server.url + "/v1/inferlets/tc/runs", {"args": PROMPT_ARGS, "stream": True})
    assert events[-1] == ("done", {"status": "finished"})
    assert [data for kind, data in events[:-1]] == whole["messages"]
    assert headers["x-run-id"].startswith("run-")


def test_a_failing_inferlet_ends_its_run_failed_with_the_error(real_server, uploaded) -> None:
    run = raw_http.request(f"{real_server.url}/v1/inferlets/tc/runs", "POST", {"args": ["--max-tokens", "3"]})[1]
    assert run["status"] == "failed" and "--prompt" in run["error"]
    assert all_pages_free(real_server)


def test_delete_cancels_a_running_run_and_frees_its_pages(real_server, default_inferlet_wasm: Path) -> None:
    """The default inferlet, run bare, sends its prompt event and then waits for a "go" that never comes."""
    assert _upload(real_server.url, default_inferlet_wasm.read_bytes(), "default-bare")[0] == 201
    request = {"version": 1, "prompts": [{"token_ids": [1, 2, 3]}], "n": 1, "max_tokens": 8,
               "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                            "logit_bias": [], "num_logprobs": None},
               "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None}
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(events=_sse(
        real_server.url + "/v1/inferlets/default-bare/runs", {"args": [json.dumps(request)], "stream": True})[0]))
    reader.start()
    deadline = time.monotonic() + 60
    while True:
        running = [r for r in raw_http.request(real_server.url + "/v1/runs")[1]["data"] if r["status"] == "running"]
        if running and running[0]["num_messages"] > 0:
            break
        assert time.monotonic() < deadline, f"the run did not start: {raw_http.request(real_server.url + '/v1/runs')[1]}"
        time.sleep(0.05)
    cancelled = raw_http.request(f"{real_server.url}/v1/runs/{running[0]['id']}", "DELETE")[1]
    assert cancelled["status"] == "cancelled"
    reader.join(timeout=60)
    kinds = [kind for kind, _ in result["events"]]
    assert kinds == ["message", "done"] and result["events"][-1][1] == {"status": "cancelled"}
    assert json.loads(result["events"][0][1])["type"] == "prompt"
    assert all_pages_free(real_server)
    raw_http.request(real_server.url + "/v1/inferlets/default-bare", "DELETE")


def test_delete_removes_an_inferlet(real_server, text_completion_wasm) -> None:
    assert _upload(real_server.url, text_completion_wasm, "tc-gone")[0] == 201
    status, body, _ = raw_http.request(real_server.url + "/v1/inferlets/tc-gone", "DELETE")
    assert status == 200 and body["deleted"] is True
    assert raw_http.request(real_server.url + "/v1/inferlets/tc-gone")[0] == 404
    assert raw_http.request(real_server.url + "/v1/inferlets/tc-gone/runs", "POST", {"args": []})[0] == 404


def test_limits_and_unknown_names(make_fake_server, tmp_path: Path) -> None:
    server = make_fake_server(max_inferlet_bytes=1000, inferlet_dir=tmp_path)
    status, body, _ = _upload(server.url, b"x" * 2000, "big")
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert _upload(server.url, b"x" * 10, "bad%20name%21")[0] == 400
    assert raw_http.request(server.url + "/v1/inferlets?name=", "POST", raw_body=b"x")[0] == 400
    assert raw_http.request(server.url + "/v1/inferlets/nothing")[0] == 404
    assert raw_http.request(server.url + "/v1/runs/run-nothing")[0] == 404
    status, body, _ = _upload(server.url, b"fake component", "ok")
    assert status == 201 and body["name"] == "ok"
    status, body, _ = _upload(server.url, b"my own default", "default")  # the server's name (vLLM: a served one)
    assert status == 409 and body["error"]["code"] == "inferlet_name_reserved" and body["error"]["param"] == "name"
    assert raw_http.request(server.url + "/v1/inferlets/default")[1]["builtin"] is True
    status, body, _ = raw_http.request(server.url + "/v1/inferlets/ok/runs", "POST", {"args": "not a list"})
    assert status == 400 and body["error"]["param"] == "args"


def test_an_inferlets_errors_name_that_inferlet(make_fake_server) -> None:
    import asyncio

    from pie_server.app.errors import ApiError
    from pie_server.app.inferlet_run import InferletRun
    from pie_server.engine.runtime.messages import Terminated
    from tests.app.fake_engine import FakeEngine, FakeHandle

    async def start(name: str | None) -> ApiError:
        handle = FakeHandle("inst-1")
        handle.outbox.put(Terminated(ok=False, error="it trapped"))
        with pytest.raises(ApiError) as failed:
            await InferletRun(handle, name).start()
        return failed.value

    named = asyncio.run(start("my-agent"))
    assert named.status == 500 and named.message == "the inferlet 'my-agent' failed: it trapped"
    assert asyncio.run(start(None)).message == "the inferlet failed: it trapped"
    server = make_fake_server(FakeEngine(fail_after_tokens=1))
    assert _upload(server.url, b"a custom component", "custom")[0] == 201
    status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST", {
        "model": "inferlet:custom", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 500 and "failed" in body["error"]["message"]
    assert "default" not in body["error"]["message"]  # it was not the default inferlet that failed


def _sse(url: str, body: dict) -> tuple[list[tuple[str, object]], dict[str, str]]:
    """(kind, data) per SSE event (done's data parsed as JSON), and the response headers."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    conn.request("POST", parts.path, body=json.dumps(body), headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    events, kind, data = [], None, []
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif not line and kind is not None:
            text = "\n".join(data)
            events.append((kind, json.loads(text) if kind == "done" else text))
            kind, data = None, []
    headers = {k.lower(): v for k, v in response.getheaders()}
    conn.close()
    return events, headers


def test_pie_upload_and_pie_runs(real_server, text_completion_wasm, tmp_path: Path, capsys) -> None:
    from pie_server.app.cli import main

    wasm = tmp_path / "tc-cli.wasm"
    wasm.write_bytes(text_completion_wasm)
    assert main(["upload", str(wasm), "--url", real_server.url]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tc-cli"
    run = raw_http.request(f"{real_server.url}/v1/inferlets/tc-cli/runs", "POST", {"args": PROMPT_ARGS})[1]
    assert main(["runs", "--url", real_server.url]) == 0
    assert run["id"] in capsys.readouterr().out
    assert main(["runs", run["id"], "--url", real_server.url]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == run["messages"]
    assert main(["upload", str(wasm), "--url", real_server.url, "--name", "no good"]) == 1
    assert "400" in capsys.readouterr().err
    raw_http.request(real_server.url + "/v1/inferlets/tc-cli", "DELETE")


def test_openai_requests_run_a_named_inferlet(real_server) -> None:
    """"model": "inferlet:NAME" runs the uploaded inferlet NAME; the default inferlet is preinstalled."""
    from tests.app.conftest import client_for

    client = client_for(real_server, timeout=120)
    question = [{"role": "user", "content": "Name three colors."}]
    assert "default" in [r["name"] for r in raw_http.request(real_server.url + "/v1/inferlets")[1]["data"]]
    served = client.chat.completions.create(model="default", messages=question, max_tokens=6, temperature=0)
    named = client.chat.completions.create(model="inferlet:default", messages=question, max_tokens=6, temperature=0)
    assert named.choices[0].message.content == served.choices[0].message.content and named.model == "inferlet:default"
    status, body, _ = raw_http.request(real_server.url + "/v1/chat/completions", "POST",
                                       {"model": "inferlet:nope", "messages": question})
    assert status == 404 and body["error"]["code"] == "model_not_found"


def _default_request(max_tokens: int) -> str:
    return json.dumps({"version": 1, "prompts": [{"token_ids": [1, 2, 3]}], "n": 1, "max_tokens": max_tokens,
                       "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                                    "logit_bias": [], "num_logprobs": None},
                       "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None})


def test_a_websocket_run_takes_messages_from_its_client(real_server) -> None:
    """The preinstalled default inferlet waits for "go" after its prompt event: sent over the socket, it
    generates, sends its text and result, and the run ends finished."""
    from websockets.sync.client import connect

    ws_url = real_server.url.replace("http://", "ws://") + "/v1/inferlets/default/ws"
    with connect(ws_url, open_timeout=30) as ws:
        ws.send(json.dumps({"args": [_default_request(5)]}))
        assert json.loads(ws.recv(timeout=60))["type"] == "run"
        prompt = json.loads(ws.recv(timeout=60))
        assert prompt["type"] == "message" and json.loads(prompt["data"])["type"] == "prompt"
        ws.send("go")
        frames = []
        while True:
            frame = json.loads(ws.recv(timeout=60))
            frames.append(frame)
            if frame["type"] == "done":
                break
    assert frames[-1] == {"type": "done", "status": "finished"}
    result = json.loads(frames[-2]["data"])
    assert result["type"] == "result" and result["choices"][0]["num_tokens"] == 5
    assert all_pages_free(real_server)


def test_websocket_errors_and_keys(real_server, make_fake_server) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    base = real_server.url.replace("http://", "ws://")
    with connect(base + "/v1/inferlets/nope/ws", open_timeout=30) as ws:
        ws.send(json.dumps({"args": []}))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["error"]["code"] == "inferlet_not_found"
    keyed = make_fake_server(api_key="k1")
    with pytest.raises(InvalidStatus):
        connect(keyed.url.replace("http://", "ws://") + "/v1/inferlets/default/ws", open_timeout=30)
    with connect(keyed.url.replace("http://", "ws://") + "/v1/inferlets/nope/ws", open_timeout=30,
                 additional_headers={"Authorization": "Bearer k1"}) as ws:
        ws.send(json.dumps({"args": []}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "inferlet_not_found"

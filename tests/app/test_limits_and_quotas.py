"""Per-run limits and per-tenant quotas end to end: a real server over the default model with two API keys, a
per-tenant limit of one instance, and the SDK-built default inferlet (preinstalled, and uploaded by one tenant
as an inferlet of its own). Run bare, the default inferlet sends its prompt event and then waits for a "go"."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from pie_server.app.config import ServerConfig
from pie_server.app.server import create_app
from tests.app import raw_http
from tests.app.conftest import MODEL_NAME, all_pages_free, client_for, wait_ready
from tests.app.server_thread import ServerThread

pytestmark = pytest.mark.timeout(600)

KEYS = (("key-of-alice", "alice"), ("key-of-bob", "bob"))
A = {"Authorization": "Bearer key-of-alice"}
B = {"Authorization": "Bearer key-of-bob"}
MAX_TIME_BUDGET_S = 120.0
MESSAGES = [{"role": "user", "content": "Name a color."}]


def _bare_request(max_tokens: int = 4) -> str:
    return json.dumps({"version": 1, "prompts": [{"token_ids": [1, 2, 3]}], "n": 1, "max_tokens": max_tokens,
                       "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                                    "logit_bias": [], "num_logprobs": None},
                       "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None})


@pytest.fixture(scope="module")
def server(default_model_dir: Path, default_inferlet_wasm: Path, pie_cache_dir: Path) -> Iterator[ServerThread]:
    from pie_server.engine.config import EngineConfig
    from pie_server.engine.engine import Engine
    from pie_server.engine.runtime.config import RuntimeConfig

    engines: list[Engine] = []

    def factory() -> Engine:
        runtime = RuntimeConfig(cache_dir=str(pie_cache_dir / "compiled"), time_budget_s=MAX_TIME_BUDGET_S,
                                max_instances_per_tenant=1)
        engines.append(Engine.start(default_model_dir, EngineConfig(num_pages=128), runtime_config=runtime,
                                    model_name=MODEL_NAME, progress=False))
        return engines[-1]

    app = create_app(factory, ServerConfig(inferlet_wasm=default_inferlet_wasm, api_keys=KEYS,
                                           inferlet_dir=Path(tempfile.mkdtemp(prefix="pie-uploads-"))))
    with ServerThread(app) as running:
        wait_ready(running, timeout_s=600)
        running.engine = engines[0]  # type: ignore[attr-defined]
        yield running


def _run(server: ServerThread, ref: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    status, answer, _ = raw_http.request(f"{server.url}/v1/inferlets/{ref}/runs", "POST", body, headers, timeout=120)
    return status, answer


def test_a_tiny_time_budget_ends_the_run_failed(server: ServerThread) -> None:
    status, run = _run(server, "default", {"args": [_bare_request()], "limits": {"time_budget_s": 0.5}}, A)
    assert status == 200 and run["status"] == "failed"
    assert "exceeded its time budget of 0.5 s" in run["error"]
    assert all_pages_free(server)


@pytest.mark.parametrize("limits, param, maximum", [
    ({"time_budget_s": MAX_TIME_BUDGET_S + 1}, "limits.time_budget_s", "120"),
    ({"memory_mib": 100_000}, "limits.memory_mib", "256"),
])
def test_limits_above_the_servers_maxima_are_400(server: ServerThread, limits: dict, param: str,
                                                 maximum: str) -> None:
    status, body = _run(server, "default", {"args": [_bare_request()], "limits": limits}, A)
    assert status == 400 and body["error"]["param"] == param and body["error"]["code"] == "limit_exceeded"
    assert f"maximum of {maximum} " in body["error"]["message"]


def test_another_tenants_uploaded_inferlet(server: ServerThread, default_inferlet_wasm: Path) -> None:
    status, mine, _ = raw_http.request(f"{server.url}/v1/inferlets?name=mine", "POST",
                                       raw_body=default_inferlet_wasm.read_bytes(),
                                       headers={"content-type": "application/wasm", **A}, timeout=300)
    assert status == 201 and mine["builtin"] is False
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", headers=B)[0] == 404
    assert _run(server, "mine", {"args": [_bare_request()]}, B)[0] == 404
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", "DELETE", headers=B)[0] == 404
    # The same bytes as the built-in default: by id, bob finds that one (everyone's), not alice's record.
    status, by_id, _ = raw_http.request(f"{server.url}/v1/inferlets/{mine['id']}", headers=B)
    assert status == 200 and by_id["name"] == "default" and by_id["builtin"] is True
    chat = {"model": "inferlet:mine", "messages": MESSAGES, "max_tokens": 2}
    status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST", chat, B)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST", chat, A, timeout=120)
    assert status == 200 and body["choices"][0]["message"]["content"]


def test_one_instance_per_tenant_then_429(server: ServerThread) -> None:
    from websockets.sync.client import connect

    alice, bob = client_for(server, api_key="key-of-alice", timeout=120), client_for(server, api_key="key-of-bob",
                                                                                      timeout=120)
    with connect(server.url.replace("http://", "ws://") + "/v1/inferlets/default/ws", open_timeout=30,
                 additional_headers=A) as ws:
        ws.send(json.dumps({"args": [_bare_request()]}))
        assert json.loads(ws.recv(timeout=60))["type"] == "run"
        assert json.loads(json.loads(ws.recv(timeout=60))["data"])["type"] == "prompt"  # waiting for "go"
        status, body = _run(server, "default", {"args": [_bare_request()]}, A)
        assert status == 429 and body["error"]["code"] == "too_many_instances"
        assert body["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):  # chat requests are the tenant's instances too
            alice.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
        assert bob.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2).choices
    deadline = time.monotonic() + 30  # the closed socket cancelled the run; its instance ends soon after
    while True:
        try:
            assert alice.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the cancelled run still counts against the tenant"
            time.sleep(0.1)
    assert all_pages_free(server)

"""Loading/failed health, API keys, client disconnects killing instances, and queueing under load."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from pie_server.app.config import ServerConfig
from pie_server.app.server import create_app
from pie_server.app.state import AppState
from tests.app import raw_http
from tests.app.conftest import client_for
from tests.app.fake_engine import REPLY, FakeEngine, RestartableEngine
from tests.app.server_thread import ServerThread
from tests.polling import wait_until

MESSAGES = [{"role": "user", "content": "Hi"}]


def test_health_is_503_while_loading_then_200(dummy_wasm) -> None:
    release = threading.Event()

    def factory() -> FakeEngine:
        release.wait(10)
        return FakeEngine()

    with ServerThread(create_app(factory, ServerConfig(inferlet_wasm=dummy_wasm))) as server:
        status, body, _ = raw_http.request(server.url + "/health")
        assert status == 503 and body["status"] == "loading"
        status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST", {"messages": MESSAGES})
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        release.set()
        wait_until(lambda: raw_http.request(server.url + "/health")[0] == 200)


def test_health_is_503_when_the_engine_failed(dummy_wasm) -> None:
    def factory() -> FakeEngine:
        raise RuntimeError("no weights here")

    with ServerThread(create_app(factory, ServerConfig(inferlet_wasm=dummy_wasm))) as server:
        wait_until(lambda: raw_http.request(server.url + "/health")[1].get("status") == "failed")
        status, body, _ = raw_http.request(server.url + "/health")
        assert status == 503 and "no weights here" in body["detail"]


def test_a_server_that_does_not_accept_before_ready_starts_serving_only_when_loaded(dummy_wasm) -> None:
    """accept_before_ready=False (each of several front ends): the lifespan waits for the engine, so the server
    takes no connection that it would answer "loading"; a failed load is still served (503 with its error)."""
    release = threading.Event()

    def slow_factory() -> FakeEngine:
        release.wait(10)
        return FakeEngine()

    def failing_factory() -> FakeEngine:
        raise RuntimeError("no weights here")

    async def enter(app) -> str:  # the lifespan's startup, as uvicorn runs it before it serves
        async with app.router.lifespan_context(app) as state:
            return state["pie"].status

    async def scenario() -> None:
        config = ServerConfig(inferlet_wasm=dummy_wasm, accept_before_ready=False)
        startup = asyncio.ensure_future(enter(create_app(slow_factory, config)))
        await asyncio.sleep(0.3)
        assert not startup.done()  # still loading: no connection would be taken yet
        release.set()
        assert await asyncio.wait_for(startup, 10) == "ready"
        assert await asyncio.wait_for(enter(create_app(failing_factory, config)), 10) == "failed"

    asyncio.run(scenario())


def test_api_key_enforced(make_fake_server) -> None:
    server = make_fake_server(api_key="sekrit")
    with pytest.raises(openai.AuthenticationError):
        client_for(server).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="wrong").models.list()
    out = client_for(server, api_key="sekrit").chat.completions.create(model="fake-model", messages=MESSAGES,
                                                                         max_tokens=2)
    assert out.choices[0].message.content == REPLY[:2]
    status, body, _ = raw_http.request(server.url + "/tokenize", "POST", {"prompt": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert raw_http.request(server.url + "/tokenize", "POST", {"prompt": "x"}, {"x-api-key": "sekrit"})[0] == 200
    for open_path in ("/health", "/metrics", "/version"):
        assert raw_http.request(server.url + open_path)[0] == 200, open_path


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_kills_the_instance(make_fake_server, stream: bool) -> None:
    engine = FakeEngine(token_delay_s=0.05)  # 100 tokens take 5 s
    server = make_fake_server(engine)
    client = client_for(server, timeout=0.3)
    if stream:  # a stream's timeout is per read: the client hangs up after a few chunks instead
        response = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=100,
                                                  stream=True)
        assert [next(response) for _ in range(3)]
        response.close()
    else:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=100)
    wait_until(lambda: engine.runtime.num_live == 0, 3.0, "the instance to end with its client")
    assert engine.runtime.launched[-1].killed.is_set()
    wait_until(lambda: server.state.num_running == 0, 3.0)


def test_many_timed_out_requests_then_one_completes(make_fake_server) -> None:
    engine = FakeEngine(token_delay_s=0.02)
    server = make_fake_server(engine, max_running_requests=16)

    async def main() -> float:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=0.2)
        results = await asyncio.gather(*[client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=200) for _ in range(60)], return_exceptions=True)
        assert all(isinstance(r, openai.APITimeoutError) for r in results)
        await client.close()
        patient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10)
        start = time.monotonic()
        out = await patient.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
        await patient.close()
        assert out.choices[0].message.content == REPLY[:3]
        return time.monotonic() - start

    assert asyncio.run(main()) < 2.0
    wait_until(lambda: engine.runtime.num_live == 0 and server.state.num_queued == 0, 5.0)


def test_requests_beyond_the_running_limit_queue_and_complete(make_fake_server) -> None:
    engine = FakeEngine(token_delay_s=0.005)
    server = make_fake_server(engine, max_running_requests=3)
    peak = {"running": 0, "waiting": 0}

    def watch() -> None:
        while not done.is_set():
            peak["running"] = max(peak["running"], server.state.num_running)
            peak["waiting"] = max(peak["waiting"], server.state.num_queued)
            time.sleep(0.002)

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        outs = await asyncio.gather(*[client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=10) for _ in range(24)])
        await client.close()
        return [o.choices[0].message.content for o in outs]

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert asyncio.run(main()) == [REPLY[:10]] * 24
    finally:
        done.set()
        watcher.join()
    assert peak["running"] == 3 and peak["waiting"] > 0


def test_requests_queue_for_kv_pages(make_fake_server) -> None:
    engine = FakeEngine(token_delay_s=0.002, num_pages=33)  # admission keeps 32 pages: 2 requests at a time
    server = make_fake_server(engine)
    assert server.state.admission.num_pages == 32
    peak = {"waiting": 0}

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        tasks = [asyncio.create_task(client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=200)) for _ in range(6)]
        while not all(t.done() for t in tasks):
            peak["waiting"] = max(peak["waiting"], server.state.admission.num_waiting)
            await asyncio.sleep(0.002)
        await client.close()
        return [t.result().choices[0].message.content for t in tasks]

    assert asyncio.run(main()) == [(REPLY * 20)[:200]] * 6  # prompt 2 pages + output 13 + 1 = 16 pages each
    assert peak["waiting"] >= 1
    assert server.state.admission.num_free == 32


def test_an_error_mid_stream_is_an_sse_data_line(make_fake_server) -> None:
    server = make_fake_server(FakeEngine(fail_after_tokens=3))
    events = raw_http.sse_events(server.url + "/v1/chat/completions",
                                 {"messages": MESSAGES, "max_tokens": 10, "stream": True})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e.get("choices")) == REPLY[:3]
    assert events[-2]["error"]["type"] == "internal_server_error"
    assert "executor failed" in events[-2]["error"]["message"]
    status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST",
                                       {"messages": MESSAGES, "max_tokens": 10})
    assert status == 500 and "executor failed" in body["error"]["message"]


_RESTART_THAT_NEVER_CONNECTS = """
import asyncio, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from pie_server.app.config import ServerConfig
from pie_server.app.state import AppState
from tests.app.fake_engine import RestartableEngine

engines = []

def factory():
    if engines:  # the restarted engine core is still loading its model: no answer yet
        threading.Event().wait()
    engines.append(RestartableEngine())
    return engines[-1]

async def main():
    state = AppState(factory, ServerConfig(inferlet_wasm=sys.argv[1], inferlet_dir=Path(sys.argv[3])))
    await state.start()
    await state.wait_ready()
    engines[0].is_alive = False
    while state.status != "restarting":
        await asyncio.sleep(0.01)
    await asyncio.wait_for(state.stop(), 5)

asyncio.run(main())
print("stopped", flush=True)
"""


def test_a_front_end_exits_while_its_restart_waits_for_the_engine_core(dummy_wasm, tmp_path) -> None:
    """SIGTERM during a restart: the serving process stops the restarted engine core only after its front ends
    have exited, so a front end must not wait (not even at interpreter exit) for its connection to that core,
    which comes only once the core has loaded its model. CI once saw `pie serve` take over 20 s to stop so."""
    repo_root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", _RESTART_THAT_NEVER_CONNECTS, str(dummy_wasm), str(repo_root), str(tmp_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process did not exit within 90 s after its state stopped") from None
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr


def test_an_engine_that_connects_after_the_stop_is_closed(dummy_wasm, tmp_path) -> None:
    release, reconnecting = threading.Event(), threading.Event()
    engines: list[RestartableEngine] = []

    def factory() -> RestartableEngine:
        if engines:
            reconnecting.set()
            release.wait(10)
        engines.append(RestartableEngine())
        return engines[-1]

    async def scenario() -> None:
        state = AppState(factory, ServerConfig(inferlet_wasm=dummy_wasm, inferlet_dir=tmp_path))
        await state.start()
        await state.wait_ready()
        engines[0].is_alive = False  # the watcher restarts it
        # Stopped once the reconnection is under way (a stop while the dead view still closes, status already
        # "restarting", rightly starts no reconnection, and the test would wait for an engine never made).
        while not reconnecting.is_set():
            await asyncio.sleep(0.01)
        await asyncio.wait_for(state.stop(), 5)

    asyncio.run(scenario())
    release.set()
    wait_until(lambda: len(engines) == 2 and engines[1].closed, 10.0, "the late engine to be closed")

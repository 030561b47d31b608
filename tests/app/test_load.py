"""Load (issue 14), through the real stack (SmolLM2-135M, the Wasm default inferlet, one process): 300 concurrent
streamed chats, a third of them hanging up after their first chunk, beside inferlet runs. Every other request
completes with its full answer, /health answers within 1 s throughout, and once it is over the KV cache usage,
the instances, threads and file descriptors are back to what they were before."""
from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
from typing import Any, Coroutine, TypeVar

import openai

from tests.app import raw_http
from tests.app.server_thread import ServerThread

NUM_STREAMS = 300
NUM_RUNS = 6
MAX_TOKENS = 6
SETTLE_S = 30.0
T = TypeVar("T")


def _chat(i: int) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": f"Count to {i}."}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0}


async def _stream(client: openai.AsyncOpenAI, i: int, hang_up: bool) -> str | None:
    """The streamed text (None: hung up after the first chunk)."""
    body = _chat(i)
    stream = await client.chat.completions.create(model=body["model"], messages=body["messages"],
                                                  max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    text, num_chunks, num_tokens = "", 0, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            num_chunks += 1
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
        if hang_up and num_chunks:
            break  # (out of the iteration first: closing the stream inside it raced the SDK's own generator)
    if hang_up and num_chunks:
        await stream.close()  # closes the connection mid-stream
        return None
    # A client slower than the engine gets several tokens in one chunk (app/inferlet_run.py), so the chunks
    # are not counted: the usage chunk says whether the whole answer came.
    assert num_chunks >= 1 and num_tokens == MAX_TOKENS, (num_chunks, num_tokens)
    return text


async def _run(url: str, i: int) -> dict[str, Any]:
    """A run of the preinstalled text-completion inferlet (POST /v1/inferlets/{name}/runs), to its end."""
    status, body, _ = await asyncio.to_thread(raw_http.request, url + "/v1/inferlets/text-completion/runs", "POST",
                                              {"args": ["--prompt", f"Run {i}:", "--max-tokens", "4"]}, None, None, 300)
    assert status == 200, body
    return body


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)


async def _load(url: str) -> tuple[list[str | None], list[dict[str, Any]]]:
    client = _client(url)
    streams = [_stream(client, i, hang_up=i % 3 == 0) for i in range(NUM_STREAMS)]
    results = await asyncio.gather(*streams, *[_run(url, i) for i in range(NUM_RUNS)])
    await client.close()
    return list(results[:NUM_STREAMS]), list(results[NUM_STREAMS:])  # type: ignore[arg-type]


def _run_collected(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) with the cyclic collector paused, and one collection on its loop at its end. A hung-up
    stream leaves the SDK's and httpx's async generators suspended, some in reference cycles: collected on the
    loop, their aclose() runs there; collected by a GC pass on another thread (the server's), one raised "async
    generator already executing" as an unraisable warning."""
    async def then_collect() -> T:
        try:
            return await main
        finally:
            gc.collect()
            await asyncio.sleep(0.05)  # the aclose() calls the collection scheduled

    gc.disable()
    try:
        return asyncio.run(then_collect())
    finally:
        gc.enable()


class HealthWatch:
    """GET /health every 50 ms on fresh connections; the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.slowest_s, self.statuses = url, 0.0, set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            started = time.monotonic()
            self.statuses.add(raw_http.request(self.url + "/health", timeout=10)[0])
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()


def _footprint(server: ServerThread) -> dict[str, float]:
    stats = server.engine.control.stats()  # type: ignore[attr-defined]
    metrics = raw_http.request(server.url + "/metrics")[1]
    kv = float(re.search(r"^pie:kv_cache_usage_perc\{[^}]*\} (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    return {"kv_cache_usage_perc": kv, "instances": stats.num_instances, "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd"))}


def _settled(server: ServerThread, before: dict[str, float]) -> dict[str, float]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        after = _footprint(server)
        if all(after[k] <= before[k] for k in before) or time.monotonic() > deadline:
            return after
        time.sleep(0.5)


def test_300_streams_a_third_hanging_up_beside_inferlet_runs(real_server: ServerThread) -> None:
    url = real_server.url
    _run_collected(_load_warm_up(url))  # builds text-completion, grows the thread pools to their size
    before = _settled(real_server, _footprint(real_server))
    started = time.monotonic()
    with HealthWatch(url) as health:
        texts, runs = _run_collected(_load(url))
    elapsed = time.monotonic() - started
    completed = [t for t in texts if t is not None]
    assert len(completed) == NUM_STREAMS - NUM_STREAMS // 3 and all(completed)
    assert all(r["status"] == "finished" and r["messages"] for r in runs), [(r["status"], r.get("error")) for r in runs]
    assert health.statuses == {200} and health.slowest_s < 1.0, (health.statuses, health.slowest_s)
    after = _settled(real_server, before)
    assert after == before or all(after[k] <= before[k] for k in before), (before, after)
    print(f"load: {NUM_STREAMS} streams + {NUM_RUNS} runs in {elapsed:.1f} s, slowest /health "
          f"{health.slowest_s * 1000:.0f} ms; before {before}, after {after}")


async def _load_warm_up(url: str) -> None:
    client = _client(url)
    await asyncio.gather(*[_stream(client, i, hang_up=i % 3 == 0) for i in range(12)], _run(url, 0))
    await client.close()

"""Load through the real stack: abandoned requests free their instances and pages at once, and more
concurrent requests than the KV cache holds queue up and all complete."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import openai
import pytest

from tests.app.conftest import all_pages_free, start_real
from tests.app.server_thread import ServerThread

MODEL = "default"


def test_200_abandoned_requests_then_one_completes_promptly(real_server) -> None:
    async def main() -> float:
        impatient = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=0.5)
        outcomes = await asyncio.gather(*[impatient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Write a long poem about the number {i}."}],
            max_tokens=64, extra_body={"ignore_eos": True}) for i in range(200)], return_exceptions=True)
        await impatient.close()
        timeouts = sum(isinstance(o, openai.APITimeoutError) for o in outcomes)
        assert timeouts >= 150, [type(o).__name__ for o in outcomes if not isinstance(o, openai.APITimeoutError)][:5]
        assert all(isinstance(o, (openai.APITimeoutError, openai.types.chat.ChatCompletion)) for o in outcomes)
        patient = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        started = time.monotonic()
        out = await patient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=4, temperature=0)
        elapsed = time.monotonic() - started
        await patient.close()
        assert out.choices[0].message.content
        return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 20.0, f"the request after the abandoned ones took {elapsed:.1f} s"
    assert all_pages_free(real_server, timeout_s=20)
    assert real_server.state.num_running == 0 and real_server.state.num_queued == 0


@pytest.fixture(scope="module")
def small_kv_server(tiny_llama_dir: Path, default_inferlet_wasm: Path, pie_cache_dir: Path) -> Iterator[ServerThread]:
    """The tiny random model with only 24 KV pages (384 tokens) in the whole pool."""
    server = start_real(tiny_llama_dir, default_inferlet_wasm, pie_cache_dir, num_pages=24)
    yield server
    server.__exit__(None, None, None)


def test_more_requests_than_the_kv_cache_holds_queue_and_complete(small_kv_server) -> None:
    pool_tokens = small_kv_server.engine.info.num_pages * small_kv_server.engine.info.page_size
    num_requests, max_tokens = 12, 40

    async def main() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=small_kv_server.url + "/v1", api_key="x", max_retries=0, timeout=300)

        def request(i: int):  # type: ignore[no-untyped-def]
            return client.completions.create(
                model=MODEL, prompt=f"Request number {i}: " + "tell me more " * 8, max_tokens=max_tokens,
                temperature=0, extra_body={"ignore_eos": True})

        alone = [await request(i) for i in range(num_requests)]  # uncontended: one at a time
        together = await asyncio.gather(*[request(i) for i in range(num_requests)])
        await client.close()
        return alone, together

    alone, outs = asyncio.run(main())
    needed = sum(o.usage.total_tokens for o in outs)
    assert needed > 2 * pool_tokens  # the requests together need far more KV than there is
    assert all(o.usage.completion_tokens == max_tokens and o.choices[0].finish_reason == "length" for o in outs)
    # Greedy: queued (admission) or preempted, each gets exactly the text it gets alone.
    texts = [o.choices[0].text for o in outs]
    assert texts == [o.choices[0].text for o in alone] and len(set(texts)) > 1, texts[:3]
    assert all_pages_free(small_kv_server)


def test_runs_that_want_more_than_pool_and_swap_complete_with_their_kv_evicted(small_kv_server) -> None:
    """Inferlet runs are not admitted by a reservation: 10 runs of 200 tokens want 130 pages of a 24-page pool with
    24 swap slots. The last resort evicts a victim's KV (pie:num_preemptions_total counts it), the SDK computes it
    again, and every run completes with exactly the text it gets alone (docs/reliability.md)."""
    url = small_kv_server.url

    def run(i: int) -> dict:
        body = json.dumps({"args": ["--prompt", f"Story {i}: once upon a time", "--max-tokens", "200"],
                           "stream": False}).encode()
        request = urllib.request.Request(f"{url}/v1/inferlets/text-completion/runs", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    def preemptions() -> float:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("pie:num_preemptions_total"))

    alone = [run(i) for i in range(10)]
    before = preemptions()
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(run, range(10)))
    assert [r["status"] for r in together] == ["finished"] * 10, [r.get("error") for r in together]
    assert [r["messages"] for r in together] == [r["messages"] for r in alone]
    assert preemptions() > before, "no eviction happened: the last resort was not tested"
    assert all_pages_free(small_kv_server)

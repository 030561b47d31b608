"""Time to first token of N chat requests sent at once (a burst), against a running server: how long the last
of them waits behind the others' front-end work (HTTP, the inferlet's start, its chat template and tokenization)
and the prefill.

    python scripts/ttft_burst.py --url http://127.0.0.1:8000 --model NAME [--requests 1 8 32 64]
"""
from __future__ import annotations

import argparse
import asyncio
import time

import httpx2 as httpx


async def _first_token_s(client: httpx.AsyncClient, url: str, model: str, index: int, started: float) -> float:
    prompt = f"Explain how a bicycle stays upright. (#{index})"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2, "stream": True,
            "temperature": 0}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


async def _burst(url: str, model: str, num_requests: int) -> list[float]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=num_requests + 8)) as client:
        for _ in range(2):  # warm-up: connections, the inferlet's first instance
            await _first_token_s(client, url, model, 0, time.perf_counter())
        started = time.perf_counter()
        return sorted(await asyncio.gather(*(_first_token_s(client, url, model, i, started)
                                             for i in range(num_requests))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32, 64])
    args = parser.parse_args()
    for num_requests in args.requests:
        ttfts = asyncio.run(_burst(args.url, args.model, num_requests))
        first, median, last = (t * 1e3 for t in (ttfts[0], ttfts[len(ttfts) // 2], ttfts[-1]))
        print(f"{num_requests:4d} at once: TTFT first {first:7.1f} ms, median {median:7.1f}, last {last:7.1f}",
              flush=True)


if __name__ == "__main__":
    main()

"""Time to first token of N chat requests sent at once (a burst), against a running server: how long the last
of them waits behind the others' front-end work (HTTP, the inferlet's start, its chat template and tokenization)
and the prefill. Each request is app/bench_load.py's (`pie bench`'s) streamed chat request, 2 tokens long.

    python scripts/ttft_burst.py --url http://127.0.0.1:8000 --model NAME [--requests 1 8 32 64] [--repeat 3]

With --repeat R each size is sent R times, --pause seconds apart (the server's idle time between bursts: what
its warm instances have to start again, docs/decisions/warm-instances.md); printed: each burst's first /
median / last TTFT, then their medians over the R bursts.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pie_server.app.bench_load import LoadConfig, one_request, warm_up

MAX_TOKENS = 2


async def _burst(config: LoadConfig, num_requests: int) -> list[float]:
    """The requests' TTFTs in seconds, sorted (each from its own start; all start together)."""
    for _ in range(2):  # connections, the inferlet's first instance
        error = await warm_up(config)
        if error is not None:
            raise SystemExit(f"warm-up failed: {error}")
    samples = await asyncio.gather(*(one_request(config, i, MAX_TOKENS) for i in range(num_requests)))
    return sorted(s.ttft_s for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeat", type=int, default=1, help="bursts of each size")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between bursts")
    args = parser.parse_args()
    for num_requests in args.requests:
        config = LoadConfig(url=args.url, model=args.model, concurrency=(num_requests,), num_requests=num_requests,
                            max_tokens=MAX_TOKENS)
        bursts = []
        for _ in range(args.repeat):
            time.sleep(args.pause)
            ttfts = asyncio.run(_burst(config, num_requests))
            bursts.append(tuple(t * 1e3 for t in (ttfts[0], ttfts[len(ttfts) // 2], ttfts[-1])))
            _print(f"{num_requests:4d} at once", bursts[-1])
        if args.repeat > 1:
            _print(f"{num_requests:4d} medians", tuple(statistics.median(b[i] for b in bursts) for i in range(3)))


def _print(label: str, ttfts_ms: tuple[float, ...]) -> None:
    first, median, last = ttfts_ms
    print(f"{label}: TTFT first {first:7.1f} ms, median {median:7.1f}, last {last:7.1f}", flush=True)


if __name__ == "__main__":
    main()

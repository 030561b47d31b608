"""What an allocation pays to evict from a full prefix cache: the full scan (count_evictable, then evict: every
entry walked twice) against one-pass eviction (PrefixCache.evict_lru), in the same process.

A pool of `--pages` pages holds the published conversations of `--conversations` clients of `--conversation-pages`
pages each; the first `--in-use` of them are still running (their pages in use, the oldest in the LRU order, as
a long-running agent's prompt is), the others are finished (cache-only). The free pages are used up, then
`--allocations` allocations of one page each must evict one.

    python -m bench.prefix_eviction [--pages 6144] [--conversations 150] [--conversation-pages 38] [--in-use 100]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.resources import Resources


def filled(args: argparse.Namespace) -> Resources:
    res = Resources(args.pages, 16, 0)
    rng = random.Random(0)
    finished = []
    for conversation in range(args.conversations):
        table = PageTable(16, None)
        block_ids = res.pool.allocate(args.conversation_pages)
        tokens = [rng.randrange(1000) for _ in range(args.conversation_pages * 16)]
        res.prefix_publish(table, tokens, table.add(block_ids))
        if conversation >= args.in_use:
            finished.append(block_ids)
    for block_ids in finished:
        res.drop(block_ids)
    res.pool.allocate(res.pool.num_free_pages)
    return res


def full_scan(res: Resources) -> Callable[[], bool]:
    """make_free(1) as it was: the exact count, then evict()."""
    def make_free() -> bool:
        if res.cache.count_evictable(res._cache_only) < 1:
            return False
        res.drop(res.cache.evict(res._cache_only, 1))
        return True
    return make_free


def one_pass(res: Resources) -> Callable[[], bool]:
    return lambda: res.make_free(1)


def median_us(res: Resources, make_free: Callable[[], bool], num_allocations: int) -> float:
    times = []
    for _ in range(num_allocations):
        started = time.perf_counter()
        if not make_free():
            raise RuntimeError("nothing left to evict: use fewer --allocations")
        times.append(time.perf_counter() - started)
        res.pool.allocate(1)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=6144)
    parser.add_argument("--conversations", type=int, default=150)
    parser.add_argument("--conversation-pages", type=int, default=38)
    parser.add_argument("--in-use", type=int, default=100)
    parser.add_argument("--allocations", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for name, way in (("full scan (count, then evict)", full_scan), ("one pass (evict_lru)", one_pass)):
        res = filled(args)
        cached = res.cache.num_blocks
        rows.append((name, cached, median_us(res, way(res), args.allocations)))
    print("| eviction | cached pages | median us per allocation |\n|---|---|---|")
    for name, cached, us in rows:
        print(f"| {name} | {cached:,} | {us:,.1f} |")
    print(f"ratio: {rows[0][2] / rows[1][2]:.0f}x")


if __name__ == "__main__":
    main()

"""KV admission: page estimates and the FIFO page semaphore."""
from __future__ import annotations

import asyncio

import pytest

from pie_server.app.kv_budget import KVBudget, KVPolicy


def test_pages_for_counts_prompt_once_and_output_per_choice() -> None:
    policy = KVPolicy(num_pages=100, page_size=16, max_output_reserve=64)
    assert policy.pages_for([20], [10], 1) == 2 + 1 + 1
    assert policy.pages_for([20], [10], 3) == 2 + 3 * (1 + 1)
    assert policy.pages_for([20], [5000], 1) == 2 + 4 + 1  # output reserve capped at 64 tokens
    assert policy.pages_for([16, 33], [16, 16], 2) == 1 + 2 * 2 + 3 + 2 * 2
    assert policy.pages_for([100_000], [1], 1) == 100  # larger than the pool: runs alone
    with pytest.raises(ValueError):
        KVPolicy(num_pages=0, page_size=16)


def test_budget_is_fifo_and_survives_cancellation() -> None:
    async def main() -> list[str]:
        budget = KVBudget(10)
        order: list[str] = []
        await budget.acquire(8)

        async def take(name: str, pages: int) -> None:
            await budget.acquire(pages)
            order.append(name)

        big = asyncio.create_task(take("big", 6))
        small = asyncio.create_task(take("small", 1))
        cancelled = asyncio.create_task(take("cancelled", 3))
        await asyncio.sleep(0.01)
        assert order == [] and budget.num_waiting == 3  # small fits, but waits behind big (FIFO)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert budget.num_waiting == 2
        budget.release(8)
        await asyncio.gather(big, small)
        assert budget.num_free == 10 - 6 - 1
        with pytest.raises(ValueError):
            await budget.acquire(11)
        return order

    assert asyncio.run(main()) == ["big", "small"]

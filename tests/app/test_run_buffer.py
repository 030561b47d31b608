"""A run's message buffer is bounded by bytes as well as by count (app/inferlet_runs.py): a run that sends
large messages while nobody reads keeps only its newest MAX bytes, in memory and in the shared run table, and
says how many it dropped; it is never held back."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pie_server.app.inferlet_runs import FINISHED, MAX_BUFFER_BYTES, RunRegistry
from pie_server.engine.runtime.messages import Terminated, Text
from tests.app.fake_engine import FakeHandle

KIB = 1 << 10
MAX_BYTES = 256 * KIB
MESSAGE_BYTES = 16 * KIB
NUM_MESSAGES = 100  # 1.6 MB sent, 6 times the bound


def _message(index: int, size: int = MESSAGE_BYTES) -> str:
    return f"{index:04d}".ljust(size, "x")


async def _finished_run(registry: RunRegistry, texts: list[str], other: RunRegistry | None = None
                        ):  # type: ignore[no-untyped-def]
    """A run that sends texts and ends; with other, half of them are in the shared table before the rest."""
    handle = FakeHandle("inst")
    run = registry.start("inferlet-id", "alice", handle)
    half = len(texts) // 2 if other is not None else len(texts)
    for text in texts[:half]:
        handle.outbox.put(Text(text))
    if other is not None:
        await _eventually(lambda: other.describe(run.id, "alice"),
                          lambda b: b is not None and b["num_messages"] == half)
    for text in texts[half:]:
        handle.outbox.put(Text(text))
    handle.outbox.put(Terminated(ok=True))
    await asyncio.wait_for(run.wait(), 10)
    return run


async def _eventually(read, good):  # type: ignore[no-untyped-def]
    for _ in range(500):  # the owner writes to the table every SYNC_INTERVAL_S
        value = await read()
        if good(value):
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(value)


def test_a_run_keeps_its_newest_messages_within_the_byte_bound(tmp_path: Path) -> None:
    num_kept = MAX_BYTES // MESSAGE_BYTES

    async def scenario() -> None:
        owner = RunRegistry(tmp_path, front_end=os.getpid(), max_bytes=MAX_BYTES)
        other = RunRegistry(tmp_path, front_end=os.getppid(), max_bytes=MAX_BYTES)  # another front end
        run = await _finished_run(owner, [_message(i) for i in range(NUM_MESSAGES)], other)
        assert run.status == FINISHED and run.num_messages == NUM_MESSAGES  # it was never held back
        assert run.num_bytes <= MAX_BYTES and len(run.messages) == num_kept
        body = run.public(with_messages=True)
        assert body["messages"] == [_message(i) for i in range(NUM_MESSAGES - num_kept, NUM_MESSAGES)]
        assert body["num_dropped_messages"] == NUM_MESSAGES - num_kept
        followed = [message async for message in run.follow()]  # a late reader: the kept ones
        assert followed == body["messages"]
        seen = await _eventually(lambda: other.describe(run.id, "alice", with_messages=True),
                                 lambda b: b["status"] == FINISHED)
        assert seen["messages"] == body["messages"]  # the table dropped the same ones, those written too
        assert seen["num_dropped_messages"] == NUM_MESSAGES - num_kept
        for registry in (owner, other):
            await registry.close()

    asyncio.run(scenario())


def test_a_message_larger_than_the_bound_is_kept_alone() -> None:
    async def scenario() -> None:
        registry = RunRegistry(None, max_bytes=MAX_BYTES)
        huge = _message(1, MAX_BYTES + 1)
        run = await _finished_run(registry, [_message(0), huge])
        assert list(run.messages) == [huge] and run.public(with_messages=True)["num_dropped_messages"] == 1
        await registry.close()

    asyncio.run(scenario())


def test_the_bound_counts_utf8_bytes_and_must_be_positive() -> None:
    async def scenario() -> None:
        registry = RunRegistry(None, max_bytes=8)
        run = await _finished_run(registry, ["ab", "éé", "€€"])  # 2, 4 and 6 bytes
        assert list(run.messages) == ["€€"] and run.num_bytes == 6
        await registry.close()

    asyncio.run(scenario())
    assert RunRegistry(None).max_bytes == MAX_BUFFER_BYTES
    with pytest.raises(ValueError, match="max_bytes"):
        RunRegistry(None, max_bytes=0)

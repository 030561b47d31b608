"""Host cost per server-sent event: our SSEResponse (app/relay.py, pre-framed strings straight to ASGI send)
against sse-starlette's EventSourceResponse, both driven through the ASGI interface with a send that only
counts bytes (no socket, no HTTP server), so the difference is the response classes' own work per event.

    .venv/bin/python bench/sse_framing.py [--events 20000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse

from pie_server.app.relay import SSEResponse

PAYLOAD = json.dumps({"id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 0, "model": "m",
                      "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]})


async def _framed(num_events: int) -> AsyncIterator[str]:
    for _ in range(num_events):
        yield f"data: {PAYLOAD}\n\n"


async def _payloads(num_events: int) -> AsyncIterator[dict[str, str]]:
    for _ in range(num_events):
        yield {"data": PAYLOAD}


async def _drive(app: Any) -> int:
    received = [0]
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await never.wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        received[0] += len(message.get("body", b""))

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    return received[0]


def _time(make: Any, num_events: int) -> float:
    started = time.process_time()
    size = asyncio.run(_drive(make(num_events)))
    assert size >= num_events * len(PAYLOAD)
    return (time.process_time() - started) / num_events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ours = lambda n: SSEResponse(_framed(n), contextlib.AsyncExitStack())  # noqa: E731
    library = lambda n: EventSourceResponse(_payloads(n))  # noqa: E731
    for name, make in (("app/relay.py SSEResponse", ours), ("sse-starlette EventSourceResponse", library)):
        runs = [_time(make, args.events) for _ in range(args.repeats)]
        print(f"{name:36s} {statistics.median(runs):6.2f} us CPU per event (median of {args.repeats})")


if __name__ == "__main__":
    main()

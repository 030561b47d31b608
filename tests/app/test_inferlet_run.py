"""InferletRun, the app's reader of one instance's messages: a client slower than the engine gets the text
that already waits as one delta (vLLM's output collector does the same), and nothing else is merged or lost."""
from __future__ import annotations

import asyncio
import json

from pie_server.app.inferlet_run import InferletRun, RunResult, TextDelta
from pie_server.engine.runtime.messages import Event, Terminated, Text
from tests.app.fake_engine import FakeHandle

RESULT = {"type": "result", "choices": [{"index": 0, "text": "abcd", "finish_reason": "length", "num_tokens": 4}]}


def _outputs(*messages: object) -> list[object]:
    handle = FakeHandle("run-1")
    for message in messages:  # all waiting before the reader starts: the slowest client
        handle.outbox.put(message)  # type: ignore[arg-type]

    async def read() -> list[object]:
        return [item async for item in InferletRun(handle).outputs()]

    return asyncio.run(read())


def test_waiting_text_on_one_channel_arrives_as_one_delta() -> None:
    outputs = _outputs(Text("a"), Text("b"), Text("c"), Text("x", channel=1), Text("d"),
                       Event(json.dumps(RESULT)), Terminated(ok=True))
    assert outputs[:3] == [TextDelta(0, "abc"), TextDelta(1, "x"), TextDelta(0, "d")]
    assert isinstance(outputs[3], RunResult) and len(outputs) == 4


def test_an_event_between_texts_keeps_its_place() -> None:
    delta = {"type": "delta", "channel": 0, "text": "c", "logprobs": [[5, -0.5, []]]}
    outputs = _outputs(Text("a"), Text("b"), Event(json.dumps(delta)), Text("d"), Event(json.dumps(RESULT)),
                       Terminated(ok=True))
    assert outputs[0] == TextDelta(0, "ab")
    assert outputs[1] == TextDelta(0, "c", ((5, -0.5, ()),))
    assert outputs[2] == TextDelta(0, "d") and isinstance(outputs[3], RunResult)


def test_text_read_as_it_comes_is_not_held_back() -> None:
    handle = FakeHandle("run-2")

    async def read() -> list[object]:
        run = InferletRun(handle)
        seen = []
        outputs = run.outputs()
        handle.outbox.put(Text("a"))
        seen.append(await outputs.__anext__())  # nothing else waits: "a" alone, at once
        handle.outbox.put(Text("b"))
        handle.outbox.put(Text("c"))
        seen.append(await outputs.__anext__())
        handle.outbox.put(Event(json.dumps(RESULT)))
        handle.outbox.put(Terminated(ok=True))
        seen.extend([item async for item in outputs])
        return seen

    seen = asyncio.run(read())
    assert seen[:2] == [TextDelta(0, "a"), TextDelta(0, "bc")] and isinstance(seen[2], RunResult)

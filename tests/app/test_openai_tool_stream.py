"""Streaming tool calls (app/openai/tool_stream.py): deltas of any size give the same calls and content as the
non-streamed parse, with a call's name sent before its arguments and nothing of a call sent as content."""
from __future__ import annotations

import json
from typing import Any

import pytest

from pie_server.app.openai.tool_stream import ToolCallStream
from pie_server.app.openai.tools import parse_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
AUTO: dict[str, Any] = {}
REQUIRED = {"tool_choice": "required"}
NAMED = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}


def stream(body: dict[str, Any], text: str, step: int) -> tuple[list[dict[str, Any]], ToolCallStream]:
    streamer = ToolCallStream(parse_tools({"tools": TOOLS, **body}))
    deltas = [d for i in range(0, len(text), step) for d in streamer.feed(text[i:i + step])]
    return deltas + streamer.finish(), streamer


def summary(deltas: list[dict[str, Any]]) -> tuple[str, list[tuple[str, Any]]]:
    """(content, [(name, parsed arguments)]), checking OpenAI's order: header (id, name, "") then pieces."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] not in calls and call["function"]["arguments"] == ""
                assert call["id"].startswith("call_") and call["type"] == "function"
                calls[call["index"]] = [call["function"]["name"], ""]
            else:
                calls[call["index"]][1] += call["function"]["arguments"]
    return content, [(name, json.loads(args)) for _, (name, args) in sorted(calls.items())]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize("body, text, content, calls", [
    (AUTO, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "R}o\\"me"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": 'R}o"me'})]),
    (AUTO, 'a <tool_call>{"name": "get_weather", "arguments": {}}</tool_call> b <tool_call>{"name": '
           '"get_weather", "parameters": {"city": "X"}}</tool_call>', "a b", [("get_weather", {}),
                                                                           ("get_weather", {"city": "X"})]),
    (AUTO, ' {"name": "get_weather", "arguments": {"city": "Rome"}} ', "", [("get_weather", {"city": "Rome"})]),
    (AUTO, '{"arguments": {"city": "Rome"}, "name": "get_weather"}', "", [("get_weather", {"city": "Rome"})]),
    (AUTO, "It is sunny <tool today.\n", "It is sunny <tool today.", []),
    (AUTO, '{"name": "other", "arguments": {}}', '{"name": "other", "arguments": {}}', []),
    (REQUIRED, '{"name": "get_weather", "arguments": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),
    (NAMED, '{"city": "Rome"}', "", [("get_weather", {"city": "Rome"})]),
])
def test_streamed_equals_whole(body, text, content, calls, step) -> None:
    deltas, streamer = stream(body, text, step)
    assert summary(deltas) == (content, calls)
    assert streamer.called == bool(calls)


def test_name_is_sent_as_soon_as_known_and_content_is_not_held_longer_than_needed() -> None:
    streamer = ToolCallStream(parse_tools({"tools": TOOLS}))
    assert streamer.feed("Sure, ") == [{"content": "Sure,"}]  # the trailing blank waits for what follows
    assert streamer.feed("<tool_") == []  # perhaps a tag
    assert streamer.feed('call>{"name": "get_weather", "arguments": {"ci') == [
        {"tool_calls": [{"index": 0, "id": streamer_id(streamer), "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}]


def streamer_id(streamer: ToolCallStream) -> Any:
    class Any_:
        def __eq__(self, other: object) -> bool:
            return isinstance(other, str) and other.startswith("call_")
    return Any_()

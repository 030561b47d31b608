"""tools / tool_choice parsing and tool-call extraction from generated text."""
from __future__ import annotations

import json

import pytest

from pie_server.app.errors import ApiError
from pie_server.app.openai.tools import extract_tool_calls, parse_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "a + b"}}]


def test_choices_and_forced_schemas() -> None:
    assert parse_tools({"tools": TOOLS}).choice == "auto"
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}) is None
    assert parse_tools({"messages": []}) is None
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.function_name == "get_weather" and named.forced_schema["required"] == ["city"]
    required = parse_tools({"tools": TOOLS, "tool_choice": "required"})
    names = [option["properties"]["name"]["const"] for option in required.forced_schema["anyOf"]]
    assert names == ["get_weather", "add"]


@pytest.mark.parametrize("body", [
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": TOOLS, "tool_choice": "sometimes"},
    {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
    {"tools": [{"type": "retrieval"}]},
    {"tools": "get_weather"},
])
def test_bad_tools_are_400(body) -> None:
    with pytest.raises(ApiError) as err:
        parse_tools(body)
    assert err.value.status == 400


def test_extract_forced_and_auto_calls() -> None:
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    [call], content = extract_tool_calls(named, '{"city": "Paris"}')
    assert (call.name, json.loads(call.arguments), content) == ("get_weather", {"city": "Paris"}, None)
    required = parse_tools({"tools": TOOLS, "tool_choice": "required"})
    [call], _ = extract_tool_calls(required, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert call.name == "add" and json.loads(call.arguments) == {"a": 1, "b": 2}
    auto = parse_tools({"tools": TOOLS})
    calls, content = extract_tool_calls(auto, 'Let me check.\n<tool_call>\n{"name": "get_weather", '
                                              '"arguments": {"city": "Rome"}}\n</tool_call>')
    assert [c.name for c in calls] == ["get_weather"] and content == "Let me check."
    calls, content = extract_tool_calls(auto, '{"name": "add", "parameters": {"a": 2}}')
    assert [c.name for c in calls] == ["add"] and content is None
    assert extract_tool_calls(auto, "It is sunny.") == ([], "It is sunny.")
    assert extract_tool_calls(auto, '{"name": "unknown_tool", "arguments": {}}')[0] == []

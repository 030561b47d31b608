"""Tools: `tools` / `tool_choice` parsing, the JSON schema that forces a call, and tool-call parsing.

Forced calls (`required` or a named function) are decoded under a JSON-schema constraint, so they work
for any model; `auto` relies on the model's chat template knowing tools and on the Hermes-style markup
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>`) or a bare JSON call object in the output.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from pie_server.app.errors import invalid
from pie_server.app.openai.fields import get_list
from pie_server.app.openai.schema_check import check_json_schema

_TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[dict[str, Any], ...]  # OpenAI tool definitions, as given to the chat template
    choice: str  # "auto", "required" or "function" (a named one)
    function_name: str | None = None  # for choice == "function"
    forced_schema: dict[str, Any] | None = None  # the constraint for required/named calls

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text
    id: str

    def to_json(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def parse_tools(body: Mapping[str, Any]) -> ToolSpec | None:
    tools = get_list(body, "tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'", "tool_choice")
        return None
    definitions = tuple(_tool(t, i) for i, t in enumerate(tools))
    names = [d["function"]["name"] for d in definitions]
    if choice is None or choice == "auto":
        return ToolSpec(definitions, "auto")
    if choice == "none":
        return None
    if choice == "required":
        schema = _any_call_schema(definitions)
        check_json_schema(schema, "tools")
        return ToolSpec(definitions, "required", forced_schema=schema)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise invalid(f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice")
        parameters = definitions[names.index(name)]["function"]["parameters"]
        check_json_schema(parameters, "tools")
        return ToolSpec(definitions, "function", function_name=name, forced_schema=parameters)
    raise invalid("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}", "tool_choice")


def _tool(tool: Any, index: int) -> dict[str, Any]:
    param = f"tools[{index}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise invalid(f"'{param}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise invalid(f"'{param}.function.name' must be 1-64 letters, digits, '_', '.' or '-'", param)
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise invalid(f"'{param}.function.parameters' must be a JSON schema object", param)
    out = {"name": name, "parameters": parameters}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return {"type": "function", "function": out}


def _any_call_schema(definitions: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One call object {"name": ..., "arguments": {...}} of any offered tool."""
    options = [{"type": "object",
                "properties": {"name": {"const": d["function"]["name"]},
                               "arguments": d["function"]["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}
               for d in definitions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def extract_tool_calls(spec: ToolSpec, text: str) -> tuple[list[ToolCall], str | None]:
    """The tool calls in a generated text, and the remaining content (None when it was all calls)."""
    if spec.choice == "function":
        return [ToolCall(spec.function_name or "", _compact(text), new_call_id())], None
    if spec.choice == "required":
        call = _as_call(_loads(text), spec)
        return ([call], None) if call else ([], text)
    return _auto_calls(spec, text)


def _auto_calls(spec: ToolSpec, text: str) -> tuple[list[ToolCall], str | None]:
    tagged = _TOOL_CALL_TAG.findall(text)
    candidates = tagged if tagged else [text.strip()]
    calls = [c for c in (_as_call(_loads(raw), spec) for raw in candidates) if c is not None]
    if not calls:
        return [], text
    rest = _TOOL_CALL_TAG.sub("", text).strip() if tagged else ""
    return calls, rest or None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def _as_call(value: Any, spec: ToolSpec) -> ToolCall | None:
    if not isinstance(value, dict) or value.get("name") not in spec.names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], text, new_call_id())


def _compact(text: str) -> str:
    value = _loads(text)
    return text if value is None else json.dumps(value, ensure_ascii=False)

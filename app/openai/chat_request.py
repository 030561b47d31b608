"""POST /v1/chat/completions: the request body -> a validated ChatRequest."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Mapping

from pie_server.app.errors import invalid
from pie_server.app.openai.fields import get_bool, get_int, get_list, get_str
from pie_server.app.openai.params import (MAX_TOP_LOGPROBS, GenerationParams, ModelLimits, check_model,
                               parse_generation, parse_response_format)
from pie_server.app.openai.tools import ToolSpec, parse_tools

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, Any], ...]  # normalized for the chat template (content is a string)
    params: GenerationParams
    logprobs: bool
    tools: ToolSpec | None  # None: no tools offered, or tool_choice "none"
    add_generation_prompt: bool = True


def parse_chat_request(body: Mapping[str, Any], limits: ModelLimits) -> ChatRequest:
    model = check_model(body, limits)
    messages = _messages(body)
    logprobs = get_bool(body, "logprobs", False)
    top_logprobs = get_int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if top_logprobs is not None and top_logprobs > 0 and not logprobs:
        raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    num_logprobs = (top_logprobs or 0) if logprobs else None
    params = parse_generation(body, limits, num_logprobs, ("max_completion_tokens", "max_tokens"))
    constraint = parse_response_format(body)
    tools = parse_tools(body)
    if tools is not None and tools.forced_schema is not None:
        if constraint is not None:
            raise invalid("'response_format' cannot be combined with a forced tool call", "response_format")
        constraint = {"type": "json_schema", "schema": tools.forced_schema}
    return ChatRequest(model=model, messages=messages, params=replace(params, constraint=constraint),
                       logprobs=logprobs, tools=tools,
                       add_generation_prompt=get_bool(body, "add_generation_prompt", True))


def _messages(body: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = get_list(body, "messages")
    if not messages:
        raise invalid("'messages' must be a non-empty array", "messages")
    return tuple(_message(m, i) for i, m in enumerate(messages))


def _message(message: Any, index: int) -> dict[str, Any]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"'{param}' must be an object", param)
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"'{param}.role' must be one of {', '.join(ROLES)}; got {role!r}", f"{param}.role")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": _content(message.get("content"), f"{param}.content")}
    name = get_str(message, "name", None)
    if name is not None:
        out["name"] = name
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
    if role == "tool":
        out["tool_call_id"] = get_str(message, "tool_call_id", "")
    if out["content"] is None:
        if role != "assistant" or "tool_calls" not in out:
            raise invalid(f"'{param}.content' is required", f"{param}.content")
        out["content"] = ""
    return out


def _content(content: Any, param: str) -> str | None:
    """A string, or an array of text parts joined (images and audio are not supported)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or an array of content parts", param)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"'{param}' holds a {kind!r} part; only text parts are supported", param)
        if not isinstance(part.get("text"), str):
            raise invalid(f"'{param}' holds a text part whose 'text' is not a string", param)
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """Earlier tool calls, with arguments parsed to objects as Hugging Face chat templates expect."""
    if not isinstance(calls, list):
        raise invalid(f"'{param}' must be an array", param)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"'{param}' entries need function.name", param)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # the template gets the raw string
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out

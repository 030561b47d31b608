"""Streaming tool calls: a choice's text deltas -> OpenAI's chat deltas, `content` or `tool_calls`.

A call is sent as OpenAI streams it: a first delta with index, id, type and function.name (arguments ""),
then deltas with pieces of function.arguments (the model's own JSON text of the arguments).

What is held back (decisions, documented in docs/api.md):
- forced calls (tool_choice `required` / a named function): the output is the call; with `required` nothing
  is sent until `{"name": "...", "arguments":` has been read;
- `auto`: content streams, except a tail that could begin `<tool_call>` (at most 10 characters) and trailing
  whitespace; from `<tool_call>` until the call's name and the start of its arguments are read; a reply
  whose first non-blank character is `{` (a bare call object) until that head is read, or to the end;
- inside a call, the arguments' last `}` and blanks (the call object's own end may follow) and a partial
  `</tool_call>`.
A head that never matches (other key order, unknown tool) is settled at the end by the same parser as the
non-streamed response (tools.extract_tool_calls): whole calls, or the held text as content.
"""
from __future__ import annotations

import json
import re
from typing import Any

from pie_server.app.openai.tools import ToolSpec, extract_tool_calls, new_call_id

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')

Delta = dict[str, Any]


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of token."""
    for size in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:size]):
            return size
    return 0


def _depth(text: str) -> int:
    """Opened minus closed braces and brackets of a JSON text, outside strings."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return depth


class ToolCallStream:
    """Per choice: feed() text deltas, finish() at the end; both return the chat deltas to send."""

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        self.num_calls = 0
        self._content = ""  # auto: content read, not yet sent
        self._call = ""  # the call being read: its raw text from the head on (or the arguments once named)
        self._in_call = spec.choice == "required"
        self._tagged = False  # the current call began with <tool_call>
        self._named = False  # the head was read: _call now holds the arguments text
        self._num_sent_args = 0
        self._started = False  # anything read yet (a leading '{' is a bare call only at the start)

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        while text:
            text = self._call_step(text, out) if self._in_call else self._content_step(text, out)
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        if self._in_call:
            if self._named:
                self._send_args(self._args_end(self._call), out)
            else:
                self._settle_unnamed(out)
        elif self._content.strip():
            out.append({"content": self._content.rstrip()})
        return out

    # ------------------------------------------------------------------------------------ content
    def _content_step(self, text: str, out: list[Delta]) -> str:
        if self.spec.choice == "function":  # the whole output is the named function's arguments
            if not self._named:
                out.append(self._header(self.spec.function_name or ""))
                self._named = True
            out.append(self._args_delta(text))
            return ""
        buffer = self._content + text
        if not self._started and buffer.strip():
            self._started = True
            if buffer.lstrip().startswith("{"):  # perhaps a bare call object
                self._content, self._in_call, self._call = "", True, ""
                return buffer
        at = buffer.find(OPEN_TAG)
        if at >= 0:
            self._send_content(buffer[:at].rstrip(), out)
            self._content, self._in_call, self._tagged, self._call = "", True, True, ""
            return buffer[at + len(OPEN_TAG):]
        partial = _partial_suffix(buffer, OPEN_TAG)
        head = buffer[:len(buffer) - partial]
        held = partial + len(head) - len(head.rstrip())
        self._send_content(buffer[:len(buffer) - held], out)
        self._content = buffer[len(buffer) - held:]
        return ""

    def _send_content(self, text: str, out: list[Delta]) -> None:
        if text:
            out.append({"content": text})

    # -------------------------------------------------------------------------------------- calls
    def _call_step(self, text: str, out: list[Delta]) -> str:
        self._call += text
        if not self._named:
            match = _HEAD.match(self._call)
            name = self._name(match)
            if name is None or match.end() == len(self._call):  # type: ignore[union-attr]
                return ""  # held until the head and the first character of the arguments are read
            out.append(self._header(name))
            self._call, self._named, self._num_sent_args = self._call[match.end():], True, 0  # type: ignore[union-attr]
        if self._tagged and CLOSE_TAG in self._call:
            at = self._call.index(CLOSE_TAG)
            rest = self._call[at + len(CLOSE_TAG):]
            self._send_args(self._args_end(self._call[:at]), out)
            self._end_call()
            return rest
        held = _partial_suffix(self._call, CLOSE_TAG) if self._tagged else 0
        self._send_args(self._args_end(self._call[:len(self._call) - held]), out)
        return ""

    def _name(self, match: re.Match[str] | None) -> str | None:
        if match is None:
            return None
        try:
            name = json.loads(f'"{match.group(1)}"')
        except json.JSONDecodeError:
            return None
        return name if name in self.spec.names else None

    @staticmethod
    def _args_end(text: str) -> str:
        """The arguments text without trailing blanks and the call object's own '}' once it came (a '}' that
        closes more than the arguments opened)."""
        text = text.rstrip()
        return text[:-1].rstrip() if text.endswith("}") and _depth(text) < 0 else text

    def _send_args(self, args: str, out: list[Delta]) -> None:
        if len(args) > self._num_sent_args and args.startswith(self._call[:self._num_sent_args]):
            out.append(self._args_delta(args[self._num_sent_args:]))
            self._num_sent_args = len(args)

    def _settle_unnamed(self, out: list[Delta]) -> None:
        raw = (OPEN_TAG if self._tagged else "") + self._call
        calls, content = extract_tool_calls(self.spec, raw)
        if content and content.strip():
            out.append({"content": content})
        for call in calls:
            out.append(self._header(call.name))
            out.append(self._args_delta(call.arguments))
            self.num_calls += 1

    def _end_call(self) -> None:
        self.num_calls += 1
        self._in_call, self._tagged, self._named, self._call = self.spec.choice == "required", False, False, ""

    def _header(self, name: str) -> Delta:
        return {"tool_calls": [{"index": self.num_calls, "id": new_call_id(), "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    def _args_delta(self, piece: str) -> Delta:
        return {"tool_calls": [{"index": self.num_calls, "function": {"arguments": piece}}]}

    @property
    def called(self) -> bool:
        return self.num_calls > 0 or self._named

"""One request's instance of the default inferlet, seen as typed protocol events.

The protocol (documented in inferlets/builtin/default/README.md): the instance is launched with one
argument, the request as JSON. It answers with
  1. a JSON event {"type": "prompt", "prompt_tokens": [...], "max_tokens": [...]} once the prompts are
     tokenized and accepted, or {"type": "error", "status", "message", "param", "code"} if not;
     it then waits for the message "go" (sent once the engine's admission has reserved its KV pages);
  2. text chunks, on channel i for choice i, as the choices are decoded, or (streamed logprobs) JSON events
     {"type": "delta", "channel": i, "text", "logprobs": [...]}; with prompt logprobs asked, before them one
     {"type": "prompt_logprobs", "prompt": p, "logprobs": [...]} per prompt;
  3. a JSON event {"type": "result", "choices": [...], "cached_tokens": [...]} with finish reasons, token
     counts, logprobs, and the prompt tokens per prompt that came from the prefix cache.
The runtime then sends its own Terminated message (ok, or the error that ended the instance).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from pie_server.app.errors import ApiError
from pie_server.app.request_trace import RequestTrace
from pie_server.engine.runtime.messages import Event, Message, Terminated, Text


class InstanceHandle(Protocol):
    id: str

    async def next_message(self) -> Message: ...

    def try_next_message(self) -> Message | None: ...

    def send(self, message: str) -> None: ...

    def kill(self) -> None: ...

    def trace_into(self, marks: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class PromptInfo:
    prompt_tokens: tuple[int, ...]  # per prompt
    max_tokens: tuple[int, ...]  # per prompt: the most tokens each of its choices may generate

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens)


# Per token: (token id, logprob, ((alternative id, logprob), ...)).
TokenLogprobs = tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...]


@dataclass(frozen=True)
class TextDelta:
    index: int  # the choice
    text: str
    logprobs: TokenLogprobs | None = None  # the logprobs of the tokens of this delta, when streamed with it


@dataclass(frozen=True)
class PromptLogprobs:
    prompt: int  # the prompt's index
    first_token_id: int  # the prompt's first token, which has no logprob
    logprobs: TokenLogprobs  # for the prompt's tokens after the first


@dataclass(frozen=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str  # "stop" or "length"
    num_tokens: int
    logprobs: TokenLogprobs | None  # per generated token; None when not asked


@dataclass(frozen=True)
class RunResult:
    choices: list[ChoiceResult]  # sorted by index
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    prompt_logprobs: dict[int, "PromptLogprobs"] = field(default_factory=dict)  # per prompt index, when asked

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)


class InferletRun:
    """Reads one instance's messages in protocol order; kill() ends it (pages freed by the runtime)."""

    def __init__(self, handle: InstanceHandle, inferlet_name: str | None = None) -> None:
        self.handle = handle
        self.finished = False
        self.trace = RequestTrace()  # where its time to first token goes (app/request_trace.py)
        self._held: Message | None = None  # read ahead by _waiting_text, not yet taken by _next
        # What errors call it: the inferlet's name when the caller gives it, else no name (never "default" for
        # an inferlet that is not the default one).
        self.what = "the inferlet" if inferlet_name is None else f"the inferlet {inferlet_name!r}"

    async def start(self) -> PromptInfo:
        """Wait for the prompt event; an error event or an early end raises ApiError."""
        message = await self._next()
        payload = self._event(message, "prompt")
        return PromptInfo(prompt_tokens=tuple(payload["prompt_tokens"]), max_tokens=tuple(payload["max_tokens"]))

    def proceed(self) -> None:
        """Let the instance generate (its pages are reserved)."""
        self.handle.send("go")

    async def outputs(self) -> AsyncIterator[TextDelta | PromptLogprobs | RunResult]:
        """Prompt logprobs and text deltas as they come, then the RunResult (last)."""
        prompt_logprobs: dict[int, PromptLogprobs] = {}
        while True:
            message = await self._next()
            if isinstance(message, Text):
                text = message.text + self._waiting_text(message.channel)
                if text:
                    yield TextDelta(message.channel, text)
                continue
            payload = self._event(message, "result", ("delta", "prompt_logprobs"))
            if payload["type"] == "delta":
                yield TextDelta(int(payload["channel"]), str(payload["text"]), _logprobs(payload["logprobs"]))
                continue
            if payload["type"] == "prompt_logprobs":
                item = PromptLogprobs(int(payload["prompt"]), int(payload["first_token_id"]),
                                      _logprobs(payload["logprobs"]))
                prompt_logprobs[item.prompt] = item
                yield item
                continue
            yield RunResult(choices=sorted((_choice(c) for c in payload["choices"]), key=lambda c: c.index),
                            cached_tokens=sum(payload.get("cached_tokens", [])), prompt_logprobs=prompt_logprobs)
            await self._drain_termination()
            return

    def kill(self) -> None:
        if not self.finished:
            self.finished = True
            self.handle.kill()

    async def _next(self) -> Message:
        if self._held is not None:
            message, self._held = self._held, None
        else:
            message = await self.handle.next_message()
        if isinstance(message, Terminated):
            self.finished = True
        return message

    def _waiting_text(self, channel: int) -> str:
        """The text of the Text messages on channel that already wait behind the one just read: a client
        slower than the engine gets them as one delta (as vLLM's output collector merges a slow consumer's
        outputs), which costs the front end one chunk instead of one per token. The first other message is
        held for _next."""
        parts = []
        while self._held is None:
            message = self.handle.try_next_message()
            if message is None:
                break
            if isinstance(message, Text) and message.channel == channel:
                parts.append(message.text)
            else:
                self._held = message
        return "".join(parts)

    def _event(self, message: Message, expected: str, also: tuple[str, ...] = ()) -> dict[str, Any]:
        if isinstance(message, Terminated):
            detail = message.error or "it ended without answering"
            raise ApiError(f"{self.what} failed: {detail}", 500)
        if not isinstance(message, Event):
            raise ApiError(f"{self.what} sent text before its {expected!r} event", 500)
        payload = json.loads(message.json)
        if payload.get("type") == "error":
            raise ApiError(str(payload.get("message", "error")), int(payload.get("status", 400)),
                           param=payload.get("param"), code=payload.get("code"))
        if payload.get("type") != expected and payload.get("type") not in also:
            raise ApiError(f"{self.what} sent {payload.get('type')!r}, expected {expected!r}", 500)
        return payload

    async def _drain_termination(self) -> None:
        while not self.finished:
            message = await self._next()
            if isinstance(message, Terminated) and not message.ok:
                raise ApiError(f"{self.what} failed: {message.error}", 500)


def _logprobs(raw: list[Any]) -> TokenLogprobs:
    return tuple((int(t), float(lp), tuple((int(a), float(alp)) for a, alp in top)) for t, lp, top in raw)


def _choice(raw: dict[str, Any]) -> ChoiceResult:
    logprobs = raw.get("logprobs")
    return ChoiceResult(
        index=int(raw["index"]), text=str(raw["text"]), finish_reason=str(raw["finish_reason"]),
        num_tokens=int(raw["num_tokens"]), logprobs=None if logprobs is None else _logprobs(logprobs))

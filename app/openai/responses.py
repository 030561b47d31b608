"""Response bodies in OpenAI's shapes: chat.completion(.chunk), text_completion, usage, logprobs, SSE."""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from json.encoder import encode_basestring  # what json.dumps(text, ensure_ascii=False) calls for one str
from typing import Any, Callable, Sequence

from pie_server.app.inferlet_run import ChoiceResult, PromptInfo, PromptLogprobs, RunResult, TokenLogprobs

DONE = "data: [DONE]\n\n"
TokenText = Callable[[int], str]  # token id -> its text

# vLLM's stand-in for -inf (JSON has no infinities).
_MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class TextChunks:
    """The SSE chunks of a stream's plain text deltas, the one event sent per token: render(index, text) gives a
    choice's chunk (its sse string) for one text; it runs once per choice with a placeholder, and each delta's
    chunk is that frame around its text as a JSON string. The same bytes as render's (tests/app/test_responses.py)
    at a thirtieth of the cost (0.2 against 7 us on the 2-core CPU machine)."""

    _PLACEHOLDER = "\x00pie-text\x00"
    _RENDERED = encode_basestring(_PLACEHOLDER)

    def __init__(self, render: Callable[[int, str], str]) -> None:
        self._render = render
        self._frames: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        frame = self._frames.get(index)
        if frame is None:
            head, found, tail = self._render(index, self._PLACEHOLDER).rpartition(self._RENDERED)
            if not found:
                raise ValueError("render must write its text as one JSON string")
            frame = self._frames[index] = (head, tail)
        return frame[0] + encode_basestring(text) + frame[1]


@dataclass(frozen=True)
class ResponseMeta:
    """What every response/chunk of one request repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> "ResponseMeta":
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def usage(prompt: PromptInfo, result: RunResult) -> dict[str, Any]:
    completion_tokens = result.num_completion_tokens
    return {"prompt_tokens": prompt.num_prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt.num_prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def _token_entry(token_id: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token_id)
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(choice: ChoiceResult, token_text: TokenText) -> dict[str, Any] | None:
    return None if choice.logprobs is None else chat_logprobs_of(choice.logprobs, token_text)


def chat_logprobs_of(logprobs: TokenLogprobs, token_text: TokenText) -> dict[str, Any]:
    content = []
    for token_id, logprob, top in logprobs:
        entry = _token_entry(token_id, logprob, token_text)
        entry["top_logprobs"] = [_token_entry(t, lp, token_text) for t, lp in top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(choice: ChoiceResult, token_text: TokenText, text_offset: int = 0) -> dict[str, Any] | None:
    return None if choice.logprobs is None else completion_logprobs_of(choice.logprobs, token_text, text_offset)


def completion_logprobs_of(logprobs: TokenLogprobs, token_text: TokenText, text_offset: int = 0,
                           first_token_id: int | None = None) -> dict[str, Any]:
    """OpenAI's legacy shape; first_token_id: a prompt's first token, listed first with null logprobs
    (echo with logprobs)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    if first_token_id is not None:
        tokens.append(token_text(first_token_id))
        token_logprobs.append(None)
        tops.append(None)
        offsets.append(offset)
        offset += len(tokens[0])
    for token_id, logprob, top in logprobs:
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(_logprob(logprob))
        tops.append({token_text(t): _logprob(lp) for t, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def join_completion_logprobs(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    if second is None:
        return first
    return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(prompt: PromptLogprobs, token_text: TokenText) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: null for the first token, then per token {id: {logprob, rank, decoded_token}}
    for the token and its top alternatives (rank: 1-based among the alternatives; null when the token is not
    among them)."""
    out: list[dict[str, Any] | None] = [None]
    for token_id, logprob, top in prompt.logprobs:
        ranks = {t: rank for rank, (t, _) in enumerate(top, start=1)}
        entry = {str(token_id): {"logprob": _logprob(logprob), "rank": ranks.get(token_id),
                                 "decoded_token": token_text(token_id)}}
        for t, lp in top:
            entry.setdefault(str(t), {"logprob": _logprob(lp), "rank": ranks[t], "decoded_token": token_text(t)})
        out.append(entry)
    return out


def chat_message(content: str | None, tool_calls: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return message


def chat_completion(meta: ResponseMeta, choices: list[dict[str, Any]], usage_body: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage_body, "system_fingerprint": None}


def chat_choice(index: int, message: dict[str, Any], finish_reason: str | None,
                logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(meta: ResponseMeta, choices: list[dict[str, Any]],
               usage_body: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
             "choices": choices, "system_fingerprint": None}
    if usage_body is not None:
        chunk["usage"] = usage_body
    return chunk


def chat_chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(meta: ResponseMeta, choices: list[dict[str, Any]], usage_body: dict[str, Any] | None,
               chunk: bool = False) -> dict[str, Any]:
    body = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "system_fingerprint": None}
    if usage_body is not None or not chunk:
        body["usage"] = usage_body
    return body


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

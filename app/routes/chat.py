"""POST /v1/chat/completions."""
from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pie_server.app.errors import ApiError
from pie_server.app.inferlet_run import ChoiceResult, PromptInfo, RunResult, TextDelta
from pie_server.app.openai import responses as R
from pie_server.app.openai.chat_request import ChatRequest, parse_chat_request
from pie_server.app.openai.inferlet_args import chat_arguments
from pie_server.app.openai.tools import extract_tool_calls
from pie_server.app.relay import TimedRelay, read_json
from pie_server.app.routes.run_response import run_and_respond
from pie_server.app.state import AppState

log = logging.getLogger("pie.app")


async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    state: AppState = request.state.pie
    view, limits = state.ready()
    chat = parse_chat_request(await read_json(request), limits)
    meta = R.ResponseMeta.new("chatcmpl", chat.model)
    stream = (lambda prompt, relay: _stream(chat, meta, prompt, relay, view.token_text)) if chat.params.stream \
        else None
    return await run_and_respond(request, state, arrival, chat.model, chat_arguments(chat), chat.params.n, stream,
                                 lambda prompt, result: _completion(chat, meta, prompt, result, view.token_text))


def _choice_message(chat: ChatRequest, result: ChoiceResult) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of one choice (tool calls parsed when tools were given)."""
    if chat.tools is not None:
        calls, content = extract_tool_calls(chat.tools, result.text)
        if calls:
            return R.chat_message(content, [c.to_json() for c in calls]), "tool_calls"
    return R.chat_message(result.text), result.finish_reason


def _completion(chat: ChatRequest, meta: R.ResponseMeta, prompt: PromptInfo, result: RunResult,
                token_text: R.TokenText) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        message, finish_reason = _choice_message(chat, choice)
        choices.append(R.chat_choice(choice.index, message, finish_reason,
                                     R.chat_logprobs(choice, token_text) if chat.logprobs else None))
    return R.chat_completion(meta, choices, R.usage(prompt, result))


async def _stream(chat: ChatRequest, meta: R.ResponseMeta, prompt: PromptInfo, relay: TimedRelay,
                  token_text: R.TokenText) -> AsyncIterator[str]:
    """Role chunk per choice, content deltas (buffered when tools may be called: a call is only known at
    the end), a last chunk per choice with its finish reason (and logprobs), the usage chunk, [DONE]."""
    usage_field = {"usage": None} if chat.params.include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return R.sse({**R.chat_chunk(meta, choices), **usage_field})

    try:
        for index in range(chat.params.n):
            yield chunk([R.chat_chunk_choice(index, {"role": "assistant", "content": ""})])
        result: RunResult | None = None
        async for item in relay.outputs():
            if isinstance(item, TextDelta):
                if chat.tools is None:
                    yield chunk([R.chat_chunk_choice(item.index, {"content": item.text})])
            else:
                result = item
        if result is None:
            raise ApiError("the default inferlet ended without a result", 500)
        for choice in result.choices:
            yield chunk([_final_choice(chat, choice, token_text)])
        relay.finish(prompt.num_prompt_tokens, result)
        if chat.params.include_usage:
            yield R.sse(R.chat_chunk(meta, [], R.usage(prompt, result)))
    except ApiError as exc:
        yield exc.sse_line()
    except Exception as exc:  # the stream has started: report in-band, never drop the connection silently
        log.exception("stream failed")
        yield ApiError(f"internal error: {type(exc).__name__}: {exc}", 500).sse_line()
    yield R.DONE


def _final_choice(chat: ChatRequest, result: ChoiceResult, token_text: R.TokenText) -> dict[str, Any]:
    logprobs = R.chat_logprobs(result, token_text) if chat.logprobs else None
    if chat.tools is None:
        return R.chat_chunk_choice(result.index, {}, result.finish_reason, logprobs)
    message, finish_reason = _choice_message(chat, result)
    delta: dict[str, Any] = {}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
    return R.chat_chunk_choice(result.index, delta, finish_reason, logprobs)

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
from pie_server.app.openai.prompt_fit import fit_arguments
from pie_server.app.openai.tool_stream import ToolCallStream
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
    arguments = await fit_arguments(chat_arguments(chat), view, "messages")
    return await run_and_respond(request, state, arrival, chat.model, arguments, chat.params.n, stream,
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
    """Role chunk per choice, deltas as they are decoded (content, or tool_calls deltas when tools were
    offered: app/openai/tool_stream.py says what is held back) with their tokens' logprobs, a last chunk per
    choice with its finish reason, the usage chunk, [DONE]."""
    usage_field = {"usage": None} if chat.params.include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return R.sse({**R.chat_chunk(meta, choices), **usage_field})

    content_chunk = R.TextChunks(lambda index, text: chunk([R.chat_chunk_choice(index, {"content": text})]))
    tools = {i: ToolCallStream(chat.tools) for i in range(chat.params.n)} if chat.tools is not None else None
    logprobs_streamed: set[int] = set()  # choices whose logprobs came with their deltas
    try:
        for index in range(chat.params.n):
            yield chunk([R.chat_chunk_choice(index, {"role": "assistant", "content": ""})])
        result: RunResult | None = None
        async for item in relay.outputs():
            if isinstance(item, TextDelta):
                if item.text and tools is None and (item.logprobs is None or not chat.logprobs):
                    yield content_chunk(item.index, item.text)  # the per-token case, pre-rendered
                    continue
                logprobs = None
                if item.logprobs is not None and chat.logprobs:
                    logprobs_streamed.add(item.index)
                    logprobs = R.chat_logprobs_of(item.logprobs, token_text)
                deltas = tools[item.index].feed(item.text) if tools else [{"content": item.text}] if item.text else []
                for k, delta in enumerate(deltas or ([{}] if logprobs else [])):
                    yield chunk([R.chat_chunk_choice(item.index, delta, None, logprobs if k == 0 else None)])
            elif isinstance(item, RunResult):
                result = item
        if result is None:
            raise ApiError("the default inferlet ended without a result", 500)
        for choice in result.choices:
            for delta in tools[choice.index].finish() if tools else []:
                yield chunk([R.chat_chunk_choice(choice.index, delta)])
            finish_reason = "tool_calls" if tools and tools[choice.index].called else choice.finish_reason
            logprobs = R.chat_logprobs(choice, token_text) \
                if chat.logprobs and choice.index not in logprobs_streamed else None
            yield chunk([R.chat_chunk_choice(choice.index, {}, finish_reason, logprobs)])
        relay.finish(prompt.num_prompt_tokens, result)
        if chat.params.include_usage:
            yield R.sse(R.chat_chunk(meta, [], R.usage(prompt, result)))
    except ApiError as exc:
        yield exc.sse_line()
    except Exception as exc:  # the stream has started: report in-band, never drop the connection silently
        log.exception("stream failed")
        yield ApiError(f"internal error: {type(exc).__name__}: {exc}", 500).sse_line()
    yield R.DONE

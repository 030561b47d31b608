"""POST /v1/completions."""
from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pie_server.app.engine_view import EngineView
from pie_server.app.errors import ApiError
from pie_server.app.inferlet_run import ChoiceResult, PromptInfo, PromptLogprobs, RunResult, TextDelta
from pie_server.app.openai import responses as R
from pie_server.app.openai.completion_request import CompletionRequest, parse_completion_request
from pie_server.app.openai.inferlet_args import completion_arguments
from pie_server.app.openai.prompt_fit import fit_arguments
from pie_server.app.relay import TimedRelay, read_json
from pie_server.app.routes.run_response import run_and_respond
from pie_server.app.state import AppState

log = logging.getLogger("pie.app")


async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state: AppState = request.state.pie
    view, limits = state.ready()
    completion = parse_completion_request(await read_json(request), limits)
    meta = R.ResponseMeta.new("cmpl", completion.model)
    echoes = _echo_texts(completion, view)
    arguments = await fit_arguments(completion_arguments(completion, view.special_prefix_ids), view, "prompt")

    def body(prompt: PromptInfo, result: RunResult) -> dict[str, Any]:
        return R.completion(meta, [_choice(completion, c, result, echoes, view.token_text) for c in result.choices],
                            R.usage(prompt, result))

    stream = (lambda prompt, relay: _stream(completion, meta, prompt, relay, view.token_text, echoes)) \
        if completion.params.stream else None
    return await run_and_respond(request, state, arrival, completion.model, arguments, completion.params.n, stream,
                                 body)


def _echo_texts(completion: CompletionRequest, view: EngineView) -> list[str]:
    """Per choice: the prompt text to put before the output (empty unless echo)."""
    texts = []
    for prompt in completion.prompts:
        text = "" if not completion.echo else prompt if isinstance(prompt, str) else view.decode(prompt)
        texts.extend([text] * completion.params.n)
    return texts


def _choice(completion: CompletionRequest, choice: ChoiceResult, result: RunResult, echoes: list[str],
            token_text: R.TokenText) -> dict[str, Any]:
    echo = echoes[choice.index]
    logprobs = R.completion_logprobs(choice, token_text, len(echo))
    prompt = result.prompt_logprobs.get(choice.index // completion.params.n)
    if logprobs is not None and completion.echo and prompt is not None:
        logprobs = R.join_completion_logprobs(_echo_logprobs(completion, prompt, token_text), logprobs)
    out = R.completion_choice(choice.index, echo + choice.text, choice.finish_reason, logprobs)
    if completion.prompt_logprobs is not None and prompt is not None:
        out["prompt_logprobs"] = R.vllm_prompt_logprobs(prompt, token_text)
    return out


def _echo_logprobs(completion: CompletionRequest, prompt: PromptLogprobs, token_text: R.TokenText) -> dict[str, Any]:
    """OpenAI's legacy echo: the prompt's tokens first, the first one with null logprobs (and the top
    `logprobs` alternatives, though prompt_logprobs may have asked for more)."""
    k = completion.logprobs or 0
    entries = tuple((t, lp, top[:k]) for t, lp, top in prompt.logprobs)
    return R.completion_logprobs_of(entries, token_text, 0, first_token_id=prompt.first_token_id)


async def _stream(completion: CompletionRequest, meta: R.ResponseMeta, prompt: PromptInfo,
                  relay: TimedRelay, token_text: R.TokenText, echoes: list[str]) -> AsyncIterator[str]:
    """The echo (with the prompt's logprobs once they come, when asked), text deltas with their tokens'
    logprobs, a last chunk per choice with its finish reason, the usage chunk, [DONE]."""
    params, n = completion.params, completion.params.n
    wants_logprobs = completion.logprobs is not None
    echo_waits = completion.num_prompt_logprobs is not None  # the echo chunk waits for the prompt's logprobs
    offsets = [len(echo) for echo in echoes]  # per choice: text_offset of its next token
    logprobs_streamed: set[int] = set()

    def chunk(choices: list[dict[str, Any]]) -> str:
        body = R.completion(meta, choices, None, chunk=True)
        return R.sse({**body, "usage": None} if params.include_usage else body)

    text_chunk = R.TextChunks(lambda index, text: chunk([R.completion_choice(index, text, None, None)]))
    try:
        for index, echo in enumerate(echoes):
            if echo and not echo_waits:
                yield chunk([R.completion_choice(index, echo, None, None)])
        result: RunResult | None = None
        async for item in relay.outputs():
            if isinstance(item, PromptLogprobs):
                for index in range(item.prompt * n, (item.prompt + 1) * n):
                    yield chunk([_first_choice(completion, index, echoes[index], item, token_text)])
            elif isinstance(item, TextDelta):
                if item.text and (item.logprobs is None or not wants_logprobs):
                    yield text_chunk(item.index, item.text)  # the per-token case, pre-rendered
                    continue
                logprobs = None
                if item.logprobs is not None and wants_logprobs:
                    logprobs_streamed.add(item.index)
                    logprobs = R.completion_logprobs_of(item.logprobs, token_text, offsets[item.index])
                    offsets[item.index] += sum(len(text) for text in logprobs["tokens"])
                if item.text or logprobs:
                    yield chunk([R.completion_choice(item.index, item.text, None, logprobs)])
            else:
                result = item
        if result is None:
            raise ApiError("the default inferlet ended without a result", 500)
        for c in result.choices:
            logprobs = None if c.index in logprobs_streamed else R.completion_logprobs(c, token_text, offsets[c.index])
            yield chunk([R.completion_choice(c.index, "", c.finish_reason, logprobs)])
        relay.finish(prompt.num_prompt_tokens, result)
        if params.include_usage:
            yield R.sse(R.completion(meta, [], R.usage(prompt, result), chunk=True))
    except ApiError as exc:
        yield exc.sse_line()
    except Exception as exc:  # the stream has started: report in-band, never drop the connection silently
        log.exception("stream failed")
        yield ApiError(f"internal error: {type(exc).__name__}: {exc}", 500).sse_line()
    yield R.DONE


def _first_choice(completion: CompletionRequest, index: int, echo: str, prompt: PromptLogprobs,
                  token_text: R.TokenText) -> dict[str, Any]:
    """The echo chunk of a choice once its prompt's logprobs came (and vLLM's prompt_logprobs when asked)."""
    echoes_logprobs = completion.echo and completion.logprobs is not None
    logprobs = _echo_logprobs(completion, prompt, token_text) if echoes_logprobs else None
    out = R.completion_choice(index, echo, None, logprobs)
    if completion.prompt_logprobs is not None:
        out["prompt_logprobs"] = R.vllm_prompt_logprobs(prompt, token_text)
    return out

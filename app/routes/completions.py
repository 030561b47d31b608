"""POST /v1/completions."""
from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pie_server.app.engine_view import EngineView
from pie_server.app.errors import ApiError
from pie_server.app.inferlet_run import PromptInfo, RunResult, TextDelta
from pie_server.app.openai import responses as R
from pie_server.app.openai.completion_request import CompletionRequest, parse_completion_request
from pie_server.app.openai.inferlet_args import completion_arguments
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
    arguments = completion_arguments(completion, view.special_prefix_ids)

    def body(prompt: PromptInfo, result: RunResult) -> dict[str, Any]:
        choices = [R.completion_choice(c.index, echoes[c.index] + c.text, c.finish_reason,
                                       R.completion_logprobs(c, view.token_text, len(echoes[c.index])))
                   for c in result.choices]
        return R.completion(meta, choices, R.usage(prompt, result))

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


async def _stream(completion: CompletionRequest, meta: R.ResponseMeta, prompt: PromptInfo,
                  relay: TimedRelay, token_text: R.TokenText, echoes: list[str]) -> AsyncIterator[str]:
    params = completion.params

    def chunk(choices: list[dict[str, Any]]) -> str:
        body = R.completion(meta, choices, None, chunk=True)
        return R.sse({**body, "usage": None} if params.include_usage else body)

    try:
        for index, echo in enumerate(echoes):
            if echo:
                yield chunk([R.completion_choice(index, echo, None, None)])
        result: RunResult | None = None
        async for item in relay.outputs():
            if isinstance(item, TextDelta):
                yield chunk([R.completion_choice(item.index, item.text, None, None)])
            else:
                result = item
        if result is None:
            raise ApiError("the default inferlet ended without a result", 500)
        for c in result.choices:
            logprobs = R.completion_logprobs(c, token_text, len(echoes[c.index]))
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

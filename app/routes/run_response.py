"""One default-inferlet run turned into an HTTP response, shared by the chat and completion routes."""
from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pie_server.app.inferlet_run import PromptInfo, RunResult
from pie_server.app.relay import ClientGone, SSEResponse, TimedRelay, collect, until_disconnected
from pie_server.app.state import AppState

StreamEvents = Callable[[PromptInfo, TimedRelay], AsyncIterator[Any]]
ResponseBody = Callable[[PromptInfo, RunResult], dict[str, Any]]


async def run_and_respond(request: Request, state: AppState, arrival: float, model: str, arguments: str, n: int,
                          stream: StreamEvents | None, body: ResponseBody) -> Response:
    """Launch the run (its instance lives in an exit stack), then stream its events (the SSE response takes
    the stack over) or collect them into one JSON body. A client that goes away ends the run (499).
    model "inferlet:NAME" runs the uploaded inferlet NAME instead of the default one."""
    program_hash = await state.program_hash_for_model(model, request)
    stack = contextlib.AsyncExitStack()
    try:
        run, prompt = await until_disconnected(request, state.enter_run(stack, arguments, n, program_hash,
                                                                        state.tenant_of(request)))
        relay = TimedRelay(run, state.metrics, arrival, state.trace_writer)
        if stream is not None:
            response = SSEResponse(stream(prompt, relay), stack)
            stack = contextlib.AsyncExitStack()  # the response owns the instance now
            return response  # type: ignore[return-value]
        result = await until_disconnected(request, collect(relay))
        relay.finish(prompt.num_prompt_tokens, result)
        return JSONResponse(body(prompt, result))
    except ClientGone:
        return Response(status_code=499)
    finally:
        await stack.aclose()

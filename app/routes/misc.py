"""GET /v1/models, /health, /version, /metrics; POST /tokenize, /detokenize."""
from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pie_server.app.errors import ApiError, invalid
from pie_server.app.metrics import CONTENT_TYPE
from pie_server.app.openai.chat_request import parse_chat_request
from pie_server.app.openai.fields import get_bool, get_list, get_str, token_id_list
from pie_server.app.openai.params import check_model
from pie_server.app.relay import read_json
from pie_server.app.state import AppState

_STARTED = int(time.time())


def _state(request: Request) -> AppState:
    return request.state.pie


async def models(request: Request) -> Response:
    _, limits = _state(request).ready()
    data = [{"id": name, "object": "model", "created": _STARTED, "owned_by": "pie",
             "root": limits.model_names[0], "parent": None, "max_model_len": limits.max_context_len}
            for name in limits.model_names]
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    state = _state(request)
    try:
        state.ready()
    except ApiError as exc:
        return JSONResponse({"status": state.status, "detail": exc.message}, status_code=503)
    return JSONResponse({"status": "ok"})


async def version(request: Request) -> Response:
    return JSONResponse({"version": _state(request).config.version})


async def metrics(request: Request) -> Response:
    state = _state(request)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def tokenize(request: Request) -> Response:
    """vLLM's shape: {"prompt": text} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}."""
    state = _state(request)
    view, limits = state.ready()
    body = await read_json(request)
    check_model(body, limits)
    add_special_tokens = get_bool(body, "add_special_tokens", "messages" not in body)
    if body.get("messages") is not None:
        chat = parse_chat_request({k: v for k, v in body.items() if k in ("messages", "tools", "model")}, limits)
        text = view.apply_chat_template(list(chat.messages), list(chat.tools.tools) if chat.tools else None,
                                        get_bool(body, "add_generation_prompt", True))
        tokens = view.encode(text)
    else:
        prompt = get_str(body, "prompt", None)
        if prompt is None:
            raise invalid("'prompt' (a string) or 'messages' is required", "prompt")
        tokens = view.encode(prompt, add_special_tokens=add_special_tokens)
    return JSONResponse({"count": len(tokens), "max_model_len": limits.max_context_len, "tokens": tokens})


async def detokenize(request: Request) -> Response:
    view, limits = _state(request).ready()
    body = await read_json(request)
    check_model(body, limits)
    tokens = get_list(body, "tokens")
    if tokens is None:
        raise invalid("'tokens' (an array of token ids) is required", "tokens")
    return JSONResponse({"prompt": view.decode(token_id_list(tokens, "tokens", limits.vocab_size))})



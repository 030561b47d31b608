"""The OpenAPI 3.1 description of the HTTP API, served at GET /openapi.json.

Invariant (tests/app/test_schemathesis.py checks it with generated requests): every status code an operation can
answer with is listed under it, with the body's schema; error bodies are OpenAI's shape (app/errors.py). 405 (a
method the path does not have) is left out, as every OpenAPI description does."""
from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_STOP = {"oneOf": [_STR, {"type": "array", "items": _STR}]}

def _object(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


_SAMPLING: dict[str, Any] = {
    "model": _STR, "n": {**_INT, "minimum": 1}, "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "max_tokens": {**_INT, "minimum": 1}, "temperature": {**_NUM, "minimum": 0},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1}, "top_k": {**_INT, "minimum": -1},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1}, "seed": _INT,
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},  # token ids
                   "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100}},
    "stop": _STOP, "stop_token_ids": {"type": "array", "items": _INT}, "ignore_eos": _BOOL, "user": _STR,
    "response_format": {"type": "object", "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}, "json_schema": {"type": "object"}}},
}

# A message's content: text, or text parts (images and audio are not supported: 400).
_CONTENT = {"oneOf": [_STR, {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"const": "text"}, "text": _STR}}}]}
_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": _STR, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": _STR, "arguments": {}}}}}
# Content is required but for an assistant message that carries tool calls.
_MESSAGE = {"oneOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "tool"]}, "content": _CONTENT, "name": _STR,
        "tool_call_id": _STR}},
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "assistant"}, "content": _CONTENT, "name": _STR,
        "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
    {"type": "object", "required": ["role", "tool_calls"], "properties": {
        "role": {"const": "assistant"}, "content": {"oneOf": [_CONTENT, {"type": "null"}]}, "name": _STR,
        "tool_calls": {"type": "array", "minItems": 1, "items": _TOOL_CALL}}},
]}
_MESSAGES = {"type": "array", "minItems": 1, "items": _MESSAGE}

_TOOL = {"type": "object", "required": ["function"], "properties": {"type": {"const": "function"}, "function": {
    "type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": _STR,
        "parameters": {"type": "object", "description": "a JSON schema"}}}}}

# What one field needs of another (the server answers 400 otherwise).
_NEEDS_STREAM = {"stream_options": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
_CHAT_NEEDS = {**_NEEDS_STREAM, "top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}

_CHAT = {"type": "object", "required": ["messages"], "dependentRequired": {"tool_choice": ["tools"]},
         "dependentSchemas": _CHAT_NEEDS, "properties": {
    **_SAMPLING, "messages": _MESSAGES,
    "max_completion_tokens": {**_INT, "minimum": 1}, "logprobs": _BOOL,
    "top_logprobs": {**_INT, "minimum": 0, "maximum": 20},
    "tools": {"type": "array", "items": _TOOL},
    "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, _object(
        {"function": _object({"name": _STR})}, type={"const": "function"})]},
}}

_COMPLETION = {"type": "object", "required": ["prompt"], "dependentSchemas": _NEEDS_STREAM, "properties": {
    **_SAMPLING,
    "prompt": {"oneOf": [_STR, {"type": "array", "items": _STR}, {"type": "array", "items": _INT},
                         {"type": "array", "items": {"type": "array", "items": _INT}}]},
    "echo": _BOOL, "logprobs": {**_INT, "minimum": 0, "maximum": 20},
}}

def _nulls_allowed(body: dict[str, Any]) -> dict[str, Any]:
    """body with null allowed for every optional field: null means "not given" (app/openai/fields.py), as
    OpenAI's SDKs send nulls for omitted fields."""
    required = set(body.get("required", ()))
    return {**body, "properties": {name: schema if name in required else {"anyOf": [schema, {"type": "null"}]}
                                   for name, schema in body["properties"].items()}}


_RUN_REQUEST = {"type": "object", "properties": {
    "args": {"type": "array", "items": _STR}, "stream": _BOOL,
    "limits": {"type": "object", "description": "this run's own, at most the server's (docs/api.md)",
               "properties": {"time_budget_s": {"type": "number", "exclusiveMinimum": 0},
                              "memory_mib": {**_INT, "minimum": 1}, "max_pages": {**_INT, "minimum": 1}}}}}



_NULLABLE_STR = {"type": ["string", "null"]}
_LOGPROBS = {"type": ["object", "null"]}
_USAGE = _object({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT})
_HEAD = {"id": _STR, "created": _INT, "model": _STR}
_CHAT_REPLY = _object({**_HEAD, "object": {"const": "chat.completion"}, "choices": {"type": "array", "items": _object(
    {"index": _INT, "finish_reason": _NULLABLE_STR, "message": _object(
        {"role": {"const": "assistant"}, "content": _NULLABLE_STR}, tool_calls={"type": "array"})},
    logprobs=_LOGPROBS)}}, usage=_USAGE)
_COMPLETION_REPLY = _object({**_HEAD, "object": {"const": "text_completion"}, "choices": {"type": "array", "items": _object(
    {"index": _INT, "text": _STR, "finish_reason": _NULLABLE_STR}, logprobs=_LOGPROBS)}}, usage=_USAGE)
_CHAT_CHUNK = _object({**_HEAD, "object": {"const": "chat.completion.chunk"}, "choices": {"type": "array", "items": _object(
    {"index": _INT, "delta": {"type": "object"}, "finish_reason": _NULLABLE_STR}, logprobs=_LOGPROBS)}},
    usage=_USAGE)
_COMPLETION_CHUNK = _object({**_HEAD, "object": {"const": "text_completion"}, "choices": {"type": "array", "items": _object(
    {"index": _INT, "text": _STR, "finish_reason": _NULLABLE_STR}, logprobs=_LOGPROBS)}}, usage=_USAGE)
# A run's stream: `message` events (whatever the inferlet sends), then one `done` with {"status", "error"?}.
_RUN_EVENT = _object({"event": {"enum": ["message", "done"]}, "data": _STR})
_MODELS = _object({"object": {"const": "list"}, "data": {"type": "array", "items": _object(
    {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR}, max_model_len=_INT)}})
_TOKENS = _object({"count": _INT, "max_model_len": _INT, "tokens": {"type": "array", "items": _INT}})
_HEALTH = _object({"status": _STR}, detail=_STR)
_INFERLET = _object({"object": {"const": "inferlet"}, "id": _NULLABLE_STR, "name": _STR, "builtin": _BOOL, "status": _STR})
_RUN = _object({"object": {"const": "run"}, "id": _STR, "inferlet_id": _STR, "created": _INT, "status": _STR,
                "num_messages": _INT}, error=_STR, messages={"type": "array", "items": _STR})
_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}}}
_DELETED = _object({"object": {"const": "inferlet.deleted"}, "id": _STR, "deleted": {"const": True}},
                   names={"type": "array", "items": _STR})
_STATS = _object({"object": {"const": "engine.stats"}, "kv_cache_usage_perc": {**_NUM, "minimum": 0, "maximum": 1},
                  "num_pages": _INT, "num_free_pages": _INT, "num_instances": _INT})
_ERROR = _object({"error": _object({"message": _STR, "type": _STR, "param": _NULLABLE_STR, "code": _NULLABLE_STR})})

_ERRORS = {
    400: "invalid request", 401: "missing or wrong API key (with --api-key)", 403: "a built-in inferlet",
    404: "unknown model, inferlet or run", 409: "the name is reserved", 413: "the body is over the size limit",
    429: "over the tenant's quota of instances (--tenant-max-instances)",
    500: "the engine or the inferlet failed", 503: "not ready (loading, the engine down) or shutting down",
}
_OPEN = (503,)  # /health, /metrics and /version need no API key
_READ = (401, 503)
_GENERATE = (400, 401, 404, 413, 429, 500, 503)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict[str, Any], errors: tuple[int, ...], body: dict[str, Any] | None = None,
        ok_status: int = 200) -> dict[str, Any]:
    """An operation answering ok_status with ok (a response's content) or one of errors in OpenAI's shape."""
    responses = {str(ok_status): {"description": "OK", **ok}}
    responses.update({str(s): {"description": _ERRORS[s], **_json(_ERROR)} for s in errors})
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, **_json(body)}
    return operation


def _streams(schema: dict[str, Any], chunk: dict[str, Any]) -> dict[str, Any]:
    """JSON, or with "stream": true Server-Sent Events: `data:` chunks (an error after the stream started is an
    error body), then `data: [DONE]`. An SSE media type's `schema` describes each event (OpenAPI 3.1)."""
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                            "contentSchema": {"anyOf": [chunk, _ERROR]}}]}
    return {"content": {"application/json": {"schema": schema},
                        "text/event-stream": {"schema": _object({"data": data})}}}


def openapi_document(version: str) -> dict[str, Any]:
    health = _op("200 when ready, 503 while loading, after a failure or while draining", _json(_HEALTH), ())
    health["responses"]["503"] = {"description": "not ready, or draining", **_json(_HEALTH)}
    version = _op("The server version", _json(_object({"version": _STR})), _OPEN)
    metrics = _op("Prometheus metrics", {"content": {"text/plain": {"schema": _STR}}}, _OPEN)
    for operation in (health, version, metrics):  # open without a key (app/auth.py OPEN_PATHS)
        operation["security"] = []
    return {
        "openapi": "3.1.0",
        "info": {"title": "pie-server", "version": version,
                 "description": "OpenAI-compatible API; chat and completions run the built-in default inferlet."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],  # the key is needed only when the server has some (--api-key)
        "paths": {
            "/v1/chat/completions": {"post": _op("Chat completion (stream with SSE)", _streams(_CHAT_REPLY, _CHAT_CHUNK),
                                                 _GENERATE, _nulls_allowed(_CHAT))},
            "/v1/completions": {"post": _op("Text completion (stream with SSE)", _streams(_COMPLETION_REPLY, _COMPLETION_CHUNK),
                                            _GENERATE, _nulls_allowed(_COMPLETION))},
            "/v1/models": {"get": _op("The served models", _json(_MODELS), _READ)},
            "/tokenize": {"post": _op("Tokenize a prompt or chat", _json(_TOKENS), (400, 401, 404, 413, 503), _nulls_allowed({
                "type": "object", "properties": {"model": _STR, "prompt": _STR, "messages": _MESSAGES,
                                                 "add_special_tokens": _BOOL}}))},
            "/detokenize": {"post": _op("Token ids to text", _json(_object({"prompt": _STR})),
                                        (400, 401, 404, 413, 503), _nulls_allowed(_object({"tokens": {
                                            "type": "array", "items": {**_INT, "minimum": 0}}}, model=_STR)))},
            "/health": {"get": health},
            "/version": {"get": version},
            "/metrics": {"get": metrics},
            "/v1/engine/stats": {"get": _op("KV-cache usage, instances, running and waiting requests (the web "
                                            "page's panel)", _json(_STATS), _READ)},
            **_inferlet_paths(),
        },
    }


def _with(parameters: list[dict[str, Any]], operation: dict[str, Any]) -> dict[str, Any]:
    return {**operation, "parameters": parameters}


def _inferlet_paths() -> dict[str, Any]:
    """/v1/inferlets and /v1/runs (app/routes/inferlets.py; docs/api.md)."""
    ref = [{"name": "ref", "in": "path", "required": True, "schema": _STR, "description": "an inferlet's id or name"}]
    run_id = [{"name": "run_id", "in": "path", "required": True, "schema": _STR}]
    upload = _op("Upload an inferlet (a Wasm component of the inferlet API)", _json(_INFERLET),
                 (400, 401, 409, 413, 503), ok_status=201)
    upload["parameters"] = [{"name": "name", "in": "query", "required": True, "schema": {
        "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}}]  # app/inferlet_store.py NAME_PATTERN
    upload["requestBody"] = {"required": True, "content": {"application/wasm": {"schema": {
        "type": "string", "format": "binary"}}}}
    upload["responses"]["201"]["description"] = "stored (same bytes: same id)"
    run_events = {"content": {"application/json": {"schema": _RUN}, "text/event-stream": {"schema": _RUN_EVENT}}}
    return {
        "/v1/inferlets": {"post": upload, "get": _op("The uploaded inferlets", _json(_LIST), _READ)},
        "/v1/inferlets/{ref}": {
            "get": _with(ref, _op("One inferlet", _json(_INFERLET), (401, 404, 503))),
            "delete": _with(ref, _op("Delete an uploaded inferlet", _json(_DELETED), (401, 403, 404, 503)))},
        "/v1/inferlets/{ref}/runs": {"post": _with(ref, _op(
            "Run an inferlet; stream: SSE `message` events, then `done`", run_events, _GENERATE, _nulls_allowed(_RUN_REQUEST)))},
        "/v1/runs": {"get": _op("Runs of this server (front end)", _json(_LIST), _READ)},
        "/v1/runs/{run_id}": {
            "get": _with(run_id, _op("One run with its messages", _json(_RUN), (401, 404, 503))),
            "delete": _with(run_id, _op("Cancel a run (its pages are freed)", _json(_RUN), (401, 404, 503)))},
    }

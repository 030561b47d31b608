"""The OpenAPI 3.1 description of the HTTP API, served at GET /openapi.json."""
from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_STOP = {"oneOf": [_STR, {"type": "array", "items": _STR}]}

_SAMPLING: dict[str, Any] = {
    "model": _STR, "n": {**_INT, "minimum": 1}, "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "max_tokens": {**_INT, "minimum": 1}, "temperature": {**_NUM, "minimum": 0},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1}, "top_k": {**_INT, "minimum": -1},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1}, "seed": _INT,
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0},
    "logit_bias": {"type": "object", "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100}},
    "stop": _STOP, "stop_token_ids": {"type": "array", "items": _INT}, "ignore_eos": _BOOL, "user": _STR,
    "response_format": {"type": "object", "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}, "json_schema": {"type": "object"}}},
}

_CHAT = {"type": "object", "required": ["messages"], "properties": {
    **_SAMPLING,
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [_STR, {"type": "array"}, {"type": "null"}]}, "name": _STR,
        "tool_calls": {"type": "array"}, "tool_call_id": _STR}}},
    "max_completion_tokens": {**_INT, "minimum": 1}, "logprobs": _BOOL,
    "top_logprobs": {**_INT, "minimum": 0, "maximum": 20},
    "tools": {"type": "array", "items": {"type": "object"}},
    "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
}}

_COMPLETION = {"type": "object", "required": ["prompt"], "properties": {
    **_SAMPLING,
    "prompt": {"oneOf": [_STR, {"type": "array", "items": _STR}, {"type": "array", "items": _INT},
                         {"type": "array", "items": {"type": "array", "items": _INT}}]},
    "echo": _BOOL, "logprobs": {**_INT, "minimum": 0, "maximum": 20},
}}

_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": _STR, "type": _STR, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _post(summary: str, schema: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK", **_json({"type": "object"})}
    if stream:
        ok["content"]["text/event-stream"] = {"schema": _STR}
    return {"post": {"summary": summary, "requestBody": {"required": True, **_json(schema)},
                     "responses": {"200": ok, "400": {"description": "invalid request", **_json(_ERROR)},
                                   "401": {"description": "missing or wrong API key", **_json(_ERROR)},
                                   "404": {"description": "unknown model", **_json(_ERROR)},
                                   "503": {"description": "not ready", **_json(_ERROR)}}}}


def _get(summary: str, media: str = "application/json") -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {media: {}}}}}}


def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "pie-server", "version": version,
                 "description": "OpenAI-compatible API; chat and completions run the built-in default inferlet."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": _post("Chat completion (stream with SSE)", _CHAT, stream=True),
            "/v1/completions": _post("Text completion (stream with SSE)", _COMPLETION, stream=True),
            "/v1/models": _get("The served models"),
            "/tokenize": _post("Tokenize a prompt or chat", {"type": "object", "properties": {
                "prompt": _STR, "messages": {"type": "array"}, "add_special_tokens": _BOOL}}),
            "/detokenize": _post("Token ids to text", {"type": "object", "required": ["tokens"],
                                                       "properties": {"tokens": {"type": "array", "items": _INT}}}),
            "/health": _get("200 when ready, 503 while loading or after a failure"),
            "/version": _get("The server version"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/v1/engine/stats": _get("KV-cache usage, instances, running and waiting requests (the web page's panel)"),
            **_inferlet_paths(),
        },
    }


def _inferlet_paths() -> dict[str, Any]:
    """/v1/inferlets and /v1/runs (app/routes/inferlets.py; docs/api.md)."""
    ref = [{"name": "ref", "in": "path", "required": True, "schema": _STR, "description": "an inferlet's id or name"}]
    run_id = [{"name": "run_id", "in": "path", "required": True, "schema": _STR}]
    upload = {"summary": "Upload an inferlet (a Wasm component of the inferlet API)",
              "parameters": [{"name": "name", "in": "query", "required": True, "schema": _STR}],
              "requestBody": {"required": True, "content": {"application/wasm": {"schema": {
                  "type": "string", "format": "binary"}}}},
              "responses": {"201": {"description": "stored (same bytes: same id)", **_json({"type": "object"})},
                            "400": {"description": "not a component of the API", **_json(_ERROR)},
                            "413": {"description": "over the size limit", **_json(_ERROR)}}}
    run = _post("Run an inferlet; stream: SSE `message` events, then `done`", {"type": "object", "properties": {
        "args": {"type": "array", "items": _STR}, "stream": _BOOL,
        "limits": {"type": "object", "description": "this run's own, at most the server's (docs/api.md)",
                   "properties": {"time_budget_s": {"type": "number", "exclusiveMinimum": 0},
                                  "memory_mib": {**_INT, "minimum": 1}, "max_pages": {**_INT, "minimum": 1}}}}},
        stream=True)["post"]
    delete = {"summary": "Delete", "responses": {"200": {"description": "OK", **_json({"type": "object"})},
                                                 "404": {"description": "unknown", **_json(_ERROR)}}}
    return {
        "/v1/inferlets": {"post": upload, **_get("The uploaded inferlets")},
        "/v1/inferlets/{ref}": {**{k: {**v, "parameters": ref} for k, v in _get("One inferlet").items()},
                                "delete": {**delete, "parameters": ref}},
        "/v1/inferlets/{ref}/runs": {"post": {**run, "parameters": ref}},
        "/v1/runs": _get("Runs of this server (front end)"),
        "/v1/runs/{run_id}": {**{k: {**v, "parameters": run_id} for k, v in _get("One run with its messages").items()},
                              "delete": {**delete, "summary": "Cancel a run (its pages are freed)",
                                         "parameters": run_id}},
    }

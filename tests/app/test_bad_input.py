"""Bad HTTP input (issue 14), table-driven over the fake engine (what is checked is the HTTP layer's): malformed
JSON, wrong types, huge and deeply nested bodies, invalid UTF-8 and absurd values get 400 (413 for a body over
the limit) in OpenAI's error shape, never a 500; and the OpenAPI description names every route."""
from __future__ import annotations

import json
from typing import Any

import pytest

from pie_server.app.server import MAX_BODY_BYTES
from tests.app import raw_http

M = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

CASES: list[tuple[str, str, Any]] = [  # (name, path, body: bytes as sent, else JSON-encoded)
    ("malformed", CHAT, b'{"messages": ['),
    ("empty", CHAT, b""),
    ("not an object", CHAT, b"[1, 2]"),
    ("null", COMPLETIONS, b"null"),
    ("invalid utf-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("NaN", CHAT, b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}'),
    ("Infinity", COMPLETIONS, b'{"prompt": "a", "top_p": Infinity}'),
    ("5000-digit integer", CHAT, b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": ' + b"9" * 5000
     + b"}"),
    ("100,000-deep arrays", CHAT, b"[" * 100_000 + b"]" * 100_000),
    ("100,000-deep in a field", CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("messages a string", CHAT, {"messages": "hi"}),
    ("content an int", CHAT, {"messages": [{"role": "user", "content": 5}]}),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "a"}]}),
    ("max_tokens a string", CHAT, {"messages": M, "max_tokens": "5"}),
    ("max_tokens a float", COMPLETIONS, {"prompt": "a", "max_tokens": 5.5}),
    ("max_tokens a bool", CHAT, {"messages": M, "max_tokens": True}),
    ("max_tokens 10^9", CHAT, {"messages": M, "max_tokens": 10**9}),
    ("max_tokens 10^9, completions", COMPLETIONS, {"prompt": "a", "max_tokens": 10**9}),
    ("n 10^6", CHAT, {"messages": M, "n": 10**6}),
    ("n 10^6, completions", COMPLETIONS, {"prompt": "a", "n": 10**6}),
    ("negative temperature", CHAT, {"messages": M, "temperature": -1}),
    ("top_p 7", COMPLETIONS, {"prompt": "a", "top_p": 7}),
    ("logit_bias id past the vocabulary", CHAT, {"messages": M, "logit_bias": {"999999999": 5}}),
    ("logit_bias id negative", COMPLETIONS, {"prompt": "a", "logit_bias": {"-1": 5}}),
    ("logit_bias id not a number", CHAT, {"messages": M, "logit_bias": {"abc": 5}}),
    ("top_logprobs 10^6", CHAT, {"messages": M, "logprobs": True, "top_logprobs": 10**6}),
    ("seed 10^30", CHAT, {"messages": M, "seed": 10**30}),
    ("stop an int", COMPLETIONS, {"prompt": "a", "stop": 5}),
    ("prompt token past the vocabulary", COMPLETIONS, {"prompt": [10**9]}),
    ("detokenize ids not ints", "/detokenize", {"tokens": ["a"]}),
    ("tokenize prompt an int", "/tokenize", {"prompt": 5}),
    ("run args not strings", "/v1/inferlets/default/runs", {"args": [1, 2]}),
    ("run stream a string", "/v1/inferlets/default/runs", {"args": [], "stream": "yes"}),
]


def _check_error_shape(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body


@pytest.mark.parametrize(("name", "path", "body"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_400_in_openais_shape(fake_server, name: str, path: str, body: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, reply, _ = raw_http.request(fake_server.url + path, "POST", raw_body=raw, timeout=30)
    assert status == 400, (status, reply)
    _check_error_shape(reply)
    assert reply["error"]["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413_at_once(fake_server) -> None:
    raw = b'{"messages": [], "x": "' + b"x" * MAX_BODY_BYTES + b'"}'
    status, reply, _ = raw_http.request(fake_server.url + CHAT, "POST", raw_body=raw, timeout=30)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    _check_error_shape(reply)


def test_a_chunked_body_over_the_limit_is_413(fake_server) -> None:
    from http.client import HTTPConnection

    def chunks():  # no Content-Length: the limit is counted as the bytes arrive
        yield b'{"messages": [], "x": "'
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"x" * (1 << 20)
        yield b'"}'

    conn = HTTPConnection("127.0.0.1", fake_server.port, timeout=30)
    conn.request("POST", CHAT, body=chunks(), headers={"content-type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    reply = json.loads(response.read())
    conn.close()
    assert response.status == 413 and reply["error"]["code"] == "request_too_large"


def test_a_20_mb_unknown_field_is_served(fake_server) -> None:
    body = {"model": "fake-model", "messages": M, "max_tokens": 3, "unknown": "x" * (20 << 20)}
    status, reply, _ = raw_http.request(fake_server.url + CHAT, "POST", body, timeout=60)
    assert status == 200 and reply["choices"][0]["message"]["content"]


def test_the_openapi_description_names_every_route(fake_server) -> None:
    status, document, _ = raw_http.request(fake_server.url + "/openapi.json")
    assert status == 200
    described = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    routes = _routes(fake_server)
    assert len(routes) > 15 and routes <= described | _UNDESCRIBED, routes - described


_UNDESCRIBED = {("/ping", "GET"), ("/openapi.json", "GET"), ("/", "GET")}  # an alias, the document, the web page


def _routes(server: Any) -> set[tuple[str, str]]:
    app = server.server.config.app
    return {(route.path, method) for route in app.routes for method in getattr(route, "methods", None) or ()
            if method != "HEAD"}

"""A 100 MB upload against the server's real limit (64 MiB): 413 in OpenAI's error shape, whether it declares its
size or streams it chunked, and the server stays healthy. (The hostile programs themselves:
tests/inferlets/test_hostile_inferlets.py.)"""
from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Callable, Iterator

from tests.app import raw_http
from tests.app.server_thread import ServerThread

UPLOAD_BYTES = 100 * 10 ** 6
CHUNK = b"\0" * (1 << 20)


def _chunks() -> Iterator[bytes]:
    for _ in range(UPLOAD_BYTES // len(CHUNK)):
        yield CHUNK


def _upload(url: str, chunked: bool) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": "application/wasm"}
    if not chunked:
        headers["Content-Length"] = str(UPLOAD_BYTES // len(CHUNK) * len(CHUNK))
    try:
        connection.request("POST", "/v1/inferlets?name=huge", body=_chunks(), headers=headers,
                           encode_chunked=chunked)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before taking all of it: the answer is still there to read
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    return response.status, body


def test_a_100_mb_upload_is_413_and_the_server_goes_on(make_fake_server: Callable[..., ServerThread]) -> None:
    server = make_fake_server()  # ServerConfig's default limit: 64 MiB
    for chunked in (False, True):
        status, body = _upload(server.url, chunked)
        assert status == 413, (chunked, body)
        assert body["error"]["type"] == "invalid_request_error" and "67108864" in body["error"]["message"]
    assert raw_http.request(server.url + "/health")[0] == 200
    assert raw_http.request(server.url + "/v1/inferlets/huge")[0] == 404  # nothing was stored

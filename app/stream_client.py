"""A minimal asyncio HTTP/1.1 client for one streamed (Server-Sent Events) POST: what `pie bench` sends.

Decision: the standard library only. The openai package is a dev dependency, not one of the server's, and a
load generator wants a thin client (no response models, no retries) so that its own per-chunk work stays small
next to the server's. One connection per request (`Connection: close`): the connect, well under a millisecond
on loopback or a LAN, counts in the request's time to first token, as for any client without a pool.
"""
from __future__ import annotations

import asyncio
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator

MAX_HEAD_BYTES = 64 << 10
READ_BYTES = 64 << 10


class RequestError(Exception):
    """The server refused the request or broke the stream; the message says how ("401: ...")."""


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: scheme, host, port and a path prefix (without the trailing /v1)."""
    host: str
    port: int
    tls: bool
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        prefix = urllib.parse.urlsplit(server_root(url)).path
        return cls(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), parts.scheme == "https",
                   prefix)


def server_root(url: str) -> str:
    """The URL without a trailing slash or /v1 (users paste the base URL they give OpenAI clients, too)."""
    url = url.rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


async def post_events(endpoint: Endpoint, path: str, body: dict[str, Any],
                      api_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """POST body as JSON to prefix + path and yield each SSE `data:` payload, parsed, until `[DONE]` or the
    end of the stream. A status other than 200 raises RequestError with the server's (OpenAI-shaped) message."""
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=True if endpoint.tls else None,
                                                   limit=MAX_HEAD_BYTES)
    try:
        writer.write(_request_bytes(endpoint, path, json.dumps(body).encode(), api_key))
        await writer.drain()
        status, headers = await _read_head(reader)
        chunks = _body_chunks(reader, headers)
        if status != 200:
            raise RequestError(f"{status}: {_error_message(b''.join([c async for c in chunks]))}")
        async for payload in _sse_data(chunks):
            if payload == "[DONE]":
                return
            yield json.loads(payload)
    finally:
        writer.close()


def _request_bytes(endpoint: Endpoint, path: str, body: bytes, api_key: str | None) -> bytes:
    host = endpoint.host if ":" not in endpoint.host else f"[{endpoint.host}]"
    lines = [f"POST {endpoint.prefix}{path} HTTP/1.1", f"Host: {host}:{endpoint.port}",
             "Content-Type: application/json", "Accept: text/event-stream", f"Content-Length: {len(body)}",
             "Connection: close"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise RequestError("the server closed the connection before answering") from None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise RequestError(f"not an HTTP response: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body as it arrives: chunked transfer encoding (what a streaming server sends), a Content-Length,
    or everything up to the close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return  # trailers, if any, are left unread: the connection closes
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(READ_BYTES):
            yield data


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data:` field of each event line (OpenAI-style streams put one JSON document on each)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[len(b"data:"):].strip().decode("utf-8")
    if pending.startswith(b"data:"):
        yield pending[len(b"data:"):].strip().decode("utf-8")


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", errors="replace").strip()[:200] or "(no body)"

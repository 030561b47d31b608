"""Raw HTTP for tests (stdlib only): JSON requests and SSE streams, no client library in between."""
from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit


def request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
            raw_body: bytes | None = None, timeout: float = 60.0) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = raw_body if raw_body is not None else None if body is None else json.dumps(body).encode()
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    content_type = response.getheader("content-type", "")
    parsed = json.loads(text) if "json" in content_type else text
    return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}


def sse_events(url: str, body: Any, headers: dict[str, str] | None = None,
               timeout: float = 60.0) -> list[Any]:
    """POST and read a whole SSE stream: the parsed data payloads, '[DONE]' kept as the string."""
    status, text, response_headers = request(url, "POST", body, headers, timeout=timeout)
    assert status == 200, text
    assert response_headers["content-type"].startswith("text/event-stream")
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events

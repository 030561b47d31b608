"""Host function of `http`: one request/response per call, only to allow-listed hosts.

Decision (docs/decisions/execution-model.md): a single `fetch` call instead of wasi:http. wasi:http's
resources and streams would need the wasmtime-internal HTTP stack (its own allow-list hooks are not exposed to
Python) and cost many host calls per request; `fetch` is one call and the check below is ours.
Redirects are not followed (a redirect could lead off the allow-list): a 3xx comes back as a response.
"""
from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future
from typing import Any

from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import GuestError, HostFunction, expect
from pie_server.engine.runtime.instance import HostTaskGen, InstanceState

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
RESPONSE = ("record", ("status", "u16"), ("headers", ("list", ("tuple", "string", "string"))), ("body", ("list", "u8")))
MAX_REQUEST_BODY_BYTES = 8 << 20


def host_allowed(host_name: str, allowed: tuple[str, ...]) -> bool:
    host_name = host_name.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == host_name or (pattern.startswith("*.") and host_name.endswith(pattern[1:])):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _fetch(method: str, url: str, headers: list[tuple[str, str]], body: bytes, timeout_s: float,
           max_bytes: int) -> dict[str, Any]:
    try:
        request = urllib.request.Request(url, data=body or None, method=method, headers=dict(headers))
        try:
            response = _OPENER.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as error:  # an HTTP error status is a normal response
            response = error
        return _read(response, max_bytes)
    except GuestError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError, timeouts, bad URLs
        raise GuestError(f"fetch failed: {error}") from None


def _read(response: Any, max_bytes: int) -> dict[str, Any]:
    with response:
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise GuestError(f"the response body exceeds {max_bytes} bytes")
        return {"status": response.status, "headers": list(response.headers.items()), "body": data}


def functions(host: Host) -> list[HostFunction]:
    config = host.config

    def start(method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Future:
        method = method.upper()
        expect(method in METHODS, f"method must be one of {', '.join(METHODS)}")
        parsed = urllib.parse.urlsplit(url)
        expect(parsed.scheme in ("http", "https") and bool(parsed.hostname), "url must be http:// or https:// with a host")
        expect(host_allowed(parsed.hostname or "", config.http_allowed_hosts),
               f"host {parsed.hostname!r} is not on the server's HTTP allow-list")
        expect(len(body) <= MAX_REQUEST_BODY_BYTES, f"request body exceeds {MAX_REQUEST_BODY_BYTES} bytes")
        expect(all("\n" not in k + v and "\r" not in k + v for k, v in headers), "header names/values must not contain newlines")
        return host.run_blocking(lambda: _fetch(method, url, headers, bytes(body), config.http_timeout_s,
                                                config.http_max_response_bytes))

    def fetch(inst: InstanceState, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> HostTaskGen:
        outcome = yield start(method, url, headers, body)
        return ("ok", outcome)

    def fetch_start(inst: InstanceState, method: str, url: str, headers: list[tuple[str, str]],
                    body: bytes) -> tuple[str, int]:
        maximum = config.http_max_pending_per_instance
        expect(len(inst.pending_fetches) < maximum,
               f"{maximum} fetches are already in flight for this instance (fetch-wait for one first)")
        future = start(method, url, headers, body)
        if inst.num_fetches_started == 0:  # an instance that ends does not leave its queued requests to the pool
            inst.on_exit.append(lambda ended: [f.cancel() for f in ended.pending_fetches.values()])
        inst.num_fetches_started += 1
        inst.pending_fetches[inst.num_fetches_started] = future
        return ("ok", inst.num_fetches_started)

    def fetch_wait(inst: InstanceState, handle: int) -> HostTaskGen:
        future = inst.pending_fetches.pop(handle, None)
        expect(future is not None, f"no fetch {handle} is in flight (each started fetch is waited for once)")
        outcome = yield future
        return ("ok", outcome)

    params = ("string", "string", ("list", ("tuple", "string", "string")), ("list", "u8"))
    return [HostFunction("http", "fetch", fetch, ("result", RESPONSE, "string"), params),
            HostFunction("http", "fetch-start", fetch_start, ("result", "u32", "string"), params),
            HostFunction("http", "fetch-wait", fetch_wait, ("result", RESPONSE, "string"), ("u32",))]

"""The instance's outside world: the tenant's key-value store, allow-listed HTTP, clocks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from wit_world.imports import clocks, http, store

from .errors import call

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")


def store_get(key: str) -> str | None:
    return store.get(key)


def store_set(key: str, value: str) -> None:
    """Fails (HostError) when the key or value is too large or the tenant's quota is full."""
    call(store.set, key, value)


def store_delete(key: str) -> bool:
    """Whether the key existed."""
    return store.delete(key)


def store_keys(prefix: str = "") -> list[str]:
    """Keys starting with prefix, sorted."""
    return list(store.list_keys(prefix))


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def fetch(url: str, method: str = "GET", headers: Mapping[str, str] | None = None,
          body: bytes | str = b"") -> Response:
    """One HTTP request to an allow-listed host; an HTTP error status is a normal Response."""
    raw = call(http.fetch, *_request(url, method, headers, body))
    return Response(raw.status, tuple(raw.headers), bytes(raw.body))


class PendingFetch:
    """A request in flight (fetch_start); wait() blocks for its Response, once."""

    def __init__(self, handle: int) -> None:
        self._handle: int | None = handle

    def wait(self) -> Response:
        if self._handle is None:
            raise RuntimeError("this fetch was already waited for")
        handle, self._handle = self._handle, None
        raw = call(http.fetch_wait, handle)
        return Response(raw.status, tuple(raw.headers), bytes(raw.body))


def fetch_start(url: str, method: str = "GET", headers: Mapping[str, str] | None = None,
                body: bytes | str = b"") -> PendingFetch:
    """Starts fetch's request and returns at once: compute (fill, flush, generate) while it is in flight, then
    wait() for the Response. The host checks it here as fetch does; at most 16 may be in flight (by default)."""
    return PendingFetch(call(http.fetch_start, *_request(url, method, headers, body)))


def _request(url: str, method: str, headers: Mapping[str, str] | None,
             body: bytes | str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    method = method.upper()
    if method not in HTTP_METHODS:
        raise ValueError(f"unsupported HTTP method {method!r}; use one of {HTTP_METHODS}")
    data = body.encode() if isinstance(body, str) else bytes(body)
    return method, url, list((headers or {}).items()), data


def now_ns() -> int:
    """Wall clock, nanoseconds since the Unix epoch."""
    return clocks.now()


def monotonic_ns() -> int:
    return clocks.monotonic()


def sleep_ms(duration_ms: int) -> None:
    """Blocks this instance (counts against its time budget)."""
    if duration_ms < 0:
        raise ValueError("duration_ms must be >= 0")
    clocks.sleep(duration_ms)

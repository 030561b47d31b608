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
    method = method.upper()
    if method not in HTTP_METHODS:
        raise ValueError(f"unsupported HTTP method {method!r}; use one of {HTTP_METHODS}")
    data = body.encode() if isinstance(body, str) else bytes(body)
    raw = call(http.fetch, method, url, list((headers or {}).items()), data)
    return Response(raw.status, tuple(raw.headers), bytes(raw.body))


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

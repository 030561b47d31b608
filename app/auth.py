"""API keys and tenants: with keys configured (`--api-key`, repeatable, and `--api-keys-file`), every endpoint
except health, metrics and version needs `Authorization: Bearer KEY` (or `x-api-key: KEY`); the web page (`/`,
`/static/...`) is open too: it holds no data and sends the key the user types with its API calls. Pure ASGI, so
streaming responses pass untouched.

Each key belongs to a tenant: the name the keys file gives it, else `key-` and the first 12 hex digits of the
key's SHA-256 (never the key itself, which appears in no log, path or response). The middleware puts the
tenant in the request's scope under TENANT_SCOPE_KEY (AppState.tenant_of reads it): uploaded inferlets, runs,
exported KV pages and the key-value store are the tenant's alone. Keys with the same name share a tenant (a key
can be rotated without losing the tenant's inferlets). Without keys, every request is the one default tenant.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from pie_server.app.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping", "/"})
OPEN_PREFIXES = ("/static/",)
TENANT_SCOPE_KEY = "pie.tenant"


def key_tenant(key: str) -> str:
    """The tenant of a key that has no name."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys_file(path: Path) -> tuple[tuple[str, str], ...]:
    """(key, tenant) per line `KEY` or `KEY NAME`; blank lines and lines starting with '#' are skipped.
    ValueError (with the line number, never the key) for anything else."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise ValueError(f"{path}:{number}: expected 'KEY' or 'KEY NAME', got {len(fields)} fields")
        pairs.append((fields[0], fields[1] if len(fields) == 2 else key_tenant(fields[0])))
    return tuple(pairs)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None = None, api_keys: Sequence[tuple[str, str]] = ()) -> None:
        """api_key: one key (its tenant: key_tenant); api_keys: (key, tenant) pairs. Neither: no authentication."""
        self.app = app
        pairs = [*(() if api_key is None else ((api_key, key_tenant(api_key)),)), *api_keys]
        # SHA-256 digests, compared in constant time: what is kept in memory is not the keys themselves.
        self._tenants = [(hashlib.sha256(key.encode()).digest(), tenant) for key, tenant in pairs]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._tenants or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        tenant = self._tenant(dict(scope["headers"]))
        if scope["type"] == "websocket" and tenant is None:
            await send({"type": "websocket.close", "code": 1008, "reason": "incorrect API key"})
            return
        if tenant is not None:
            scope[TENANT_SCOPE_KEY] = tenant
        elif scope["path"] not in OPEN_PATHS and not scope["path"].startswith(OPEN_PREFIXES) \
                and scope["method"] != "OPTIONS":
            response = ApiError("Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.", 401,
                                code="invalid_api_key").response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _tenant(self, headers: dict[bytes, bytes]) -> str | None:
        """The tenant of the request's key; None without a key or with a wrong one. Every key is compared,
        so the time taken does not say which (or how many) came close."""
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given[:7].lower() == "bearer " \
            else headers.get(b"x-api-key", b"").decode("latin-1")
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for key_digest, tenant in self._tenants:
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        return found

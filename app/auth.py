"""API-key check: with `--api-key`, every endpoint except health, metrics and version needs
`Authorization: Bearer KEY` (or `x-api-key: KEY`). Pure ASGI, so streaming responses pass untouched."""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from pie_server.app.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.api_key is not None \
                and not self._authorized(dict(scope["headers"])):
            await send({"type": "websocket.close", "code": 1008, "reason": "incorrect API key"})
            return
        if self.api_key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS \
                or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if not self._authorized(dict(scope["headers"])):
            response = ApiError("Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.", 401,
                                code="invalid_api_key").response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
        return hmac.compare_digest(token.encode(), self.api_key.encode())

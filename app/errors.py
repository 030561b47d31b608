"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the HTTP surface reports goes through ApiError, so clients always get this shape and a
4xx/5xx status that says whose fault it was (never 422, never a bare 500 for bad input).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("pie.app")

# OpenAI's `type` values by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "request_cancelled",
    500: "internal_server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse_line(self) -> str:
        """The error as one SSE data line (errors that happen after a stream started)."""
        return f"data: {json.dumps(self.body())}\n\n"


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(message, 400, param=param, code=code)


async def api_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def http_error_handler(_request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    return ApiError(str(exc.detail), exc.status_code).response()


async def unexpected_error_handler(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return ApiError(f"internal error: {type(exc).__name__}: {exc}", 500).response()


EXCEPTION_HANDLERS = {
    ApiError: api_error_handler,
    HTTPException: http_error_handler,
    Exception: unexpected_error_handler,
}

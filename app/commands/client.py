"""What `pie upload` and `pie runs` share: talking to a running server's HTTP API (urllib: no client library)."""
from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("PIE_URL", DEFAULT_URL),
                        help=f"the server (default: $PIE_URL, else {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("PIE_API_KEY"),
                        help="the server's API key (default: $PIE_API_KEY)")


class ServerError(Exception):
    """The server answered with an error (its OpenAI-shaped message), or could not be reached."""


def call(args: argparse.Namespace, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json", timeout_s: float = 600.0) -> Any:
    request = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method)
    request.add_header("content-type", content_type)
    if args.api_key:
        request.add_header("authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = error.reason
        raise ServerError(f"{error.code}: {message}") from None
    except urllib.error.URLError as error:
        raise ServerError(f"cannot reach {args.url}: {error.reason}") from None

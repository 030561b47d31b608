"""`pie upload INFERLET --name NAME`: upload an inferlet to a running server (POST /v1/inferlets).

INFERLET is a built component (.wasm) or a Python inferlet (a .py file or a folder with main.py), built first
(cached). Prints the stored inferlet (its id is the sha256 of the bytes); run it with
`curl -X POST $URL/v1/inferlets/NAME/runs -d '{"args": [...]}'` (docs/api.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.parse
from pathlib import Path

from pie_server.app.commands.client import ServerError, add_server_arguments, call

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUMMARY = "upload an inferlet (.wasm or Python source) to a running server"
DESCRIPTION = """\
Uploads an inferlet to a running server (POST /v1/inferlets) and prints the stored record; its id is the
SHA-256 of the bytes, and uploading the same bytes again gives the same id. Then run it by name: POST
/v1/inferlets/NAME/runs, a WebSocket at /v1/inferlets/NAME/ws, or "model": "inferlet:NAME" in a chat
completion (docs/api.md)."""
EXAMPLES = """\
  pie upload tc.wasm --name tc
  pie upload my_sampler.py                           # built first; named my_sampler
  pie upload agent.wasm --name agent --url http://gpu-box:8000 --api-key KEY"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inferlet", type=Path, help="a component (.wasm) or a Python inferlet (file or folder)")
    parser.add_argument("--name", default=None, help="the name to run it by (default: the file or folder name)")
    add_server_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if not args.inferlet.exists():
        print(f"pie upload: error: {args.inferlet}: no such file or folder", file=sys.stderr)
        return EXIT_USAGE
    name = args.name or args.inferlet.stem
    try:
        wasm = _wasm_of(args.inferlet)
        record = call(args, "POST", "/v1/inferlets?" + urllib.parse.urlencode({"name": name}), wasm,
                      content_type="application/wasm")
    except ServerError as error:
        print(f"pie upload: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(record, indent=2))
    return EXIT_OK


def _wasm_of(path: Path) -> bytes:
    if path.suffix == ".wasm":
        return path.read_bytes()
    from pie_server.app.inferlet_build import BuildError, build_inferlet

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return build_inferlet(path, Path(tmp) / "inferlet.wasm").read_bytes()
        except BuildError as error:
            raise ServerError(f"the build failed: {error}") from None

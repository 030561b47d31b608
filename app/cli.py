"""The `pie` command: serve, build, run, upload, runs."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Each subcommand lives in app/commands/<name>.py with add_arguments(parser) and main(args) -> int.
SUBCOMMANDS = {
    "serve": "start the OpenAI-compatible HTTP server",
    "build": "build an inferlet (a Python file or folder) into a Wasm component",
    "run": "run an inferlet locally against the engine and print what it sends",
    "upload": "upload an inferlet (.wasm, or Python source built first) to a running server",
    "runs": "list, show or cancel the inferlet runs of a running server",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pie", description="A programmable, OpenAI-compatible LLM server")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"pie_server.app.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    module = importlib.import_module(f"pie_server.app.commands.{args.command}")
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

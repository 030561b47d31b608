"""`pie build DIR_OR_FILE -o out.wasm`: build a Python inferlet into a Wasm component (componentize-py).

The source is a .py file or a folder with main.py; its module defines `def main(args: list[str]) -> None`.
Builds are cached by the content hash of the sources, the SDK and the WIT (see app/inferlet_build.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pie_server.app.inferlet_build import BuildError, build_inferlet, find_source, is_cached
from pie_server.engine.progress import show_progress

EXIT_OK, EXIT_FAILED = 0, 1
SUMMARY = "build a Python inferlet (.py file or folder) into a Wasm component"
DESCRIPTION = """\
Builds an inferlet with componentize-py (a few seconds; then cached by the content hash of the sources, the
SDK and the WIT). Its module defines `def main(args: list[str]) -> None` and uses the SDK, pie_sdk
(docs/sdk.md, docs/tutorial.md). The component runs with `pie run` or, uploaded, on a server."""
EXAMPLES = """\
  pie build inferlets/contrib/text-completion -o tc.wasm
  pie build my_sampler.py                            # writes my_sampler.wasm
  pie build my_agent/ -o agent.wasm --no-cache       # a folder with main.py, rebuilt"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a .py file, or a folder with main.py")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="the component to write (default: <name>.wasm in the current folder)")
    parser.add_argument("--no-cache", action="store_true", help="build even when a cached build exists")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        source = find_source(args.source)
        out = args.output or Path(f"{source.name}.wasm")
        cached = not args.no_cache and is_cached(args.source)
        if not cached and not show_progress():  # else the spinner says so
            print(f"pie build: building {args.source} (componentize-py, a few seconds)", file=sys.stderr, flush=True)
        build_inferlet(args.source, out, use_cache=not args.no_cache)
    except BuildError as error:
        print(f"pie build: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    size_mb = out.stat().st_size / 1e6
    how = "cached" if cached else f"{time.perf_counter() - started:.1f} s"
    print(f"pie build: wrote {out} ({size_mb:.1f} MB, {how})", file=sys.stderr)
    return EXIT_OK

"""The `pie` command: serve, bench, build, run, upload, runs.

Each subcommand lives in app/commands/<name>.py with add_arguments(parser), main(args) -> int and its help
texts: SUMMARY (one line, for `pie --help`), DESCRIPTION and EXAMPLES (for `pie NAME --help`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
from types import ModuleType
from typing import Sequence

from pie_server.app.import_path import drop_checkout_root
from pie_server.engine.progress import ENV_VAR as PROGRESS_ENV_VAR

COMMAND_GROUPS = (
    ("serve and measure", ("serve", "bench")),
    ("inferlets (programs that drive generation, sandboxed as Wasm)", ("build", "run", "upload", "runs")),
)
# Commands with something slow to show (loading a model, building an inferlet, a benchmark's levels).
PROGRESS_COMMANDS = frozenset({"serve", "bench", "build", "run", "upload"})

DESCRIPTION = """\
Pie: a programmable, OpenAI-compatible LLM server. Generation is a program, an inferlet, that runs sandboxed
as WebAssembly; /v1/chat/completions and /v1/completions run a built-in one."""
EXAMPLES = """\
  pie serve                                   # the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000
  pie build inferlets/contrib/text-completion -o tc.wasm
  pie run tc.wasm -- --prompt "The capital of France is" --max-tokens 16
  pie upload tc.wasm --name tc                # then POST /v1/inferlets/tc/runs (docs/api.md)
  pie bench --concurrency 1 8 --max-tokens 128"""


class HelpFormatter(argparse.HelpFormatter):
    """Fills prose paragraphs to the terminal's width and keeps those with indented lines (the command list,
    examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(part if any(line.startswith(" ") for line in part.splitlines())
                            else super(HelpFormatter, self)._fill_text(part, width, indent)
                            for part in text.split("\n\n"))


def build_parser() -> argparse.ArgumentParser:
    modules = {name: importlib.import_module(f"pie_server.app.commands.{name}")
               for _, names in COMMAND_GROUPS for name in names}
    parser = argparse.ArgumentParser(
        prog="pie", usage="pie [-h] [--version] COMMAND ...", description=DESCRIPTION + "\n\n" + _overview(modules),
        epilog=f"examples:\n{EXAMPLES}\n\n`pie COMMAND --help` shows a command's options and more examples.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pie {_version()}")
    # The commands are listed, grouped, in the description; argparse's own flat list is hidden (and with it
    # COMMAND from the generated usage, hence the explicit one).
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="pie")
    for name, module in modules.items():
        child = sub.add_parser(name, description=module.DESCRIPTION, epilog=f"examples:\n{module.EXAMPLES}",
                               formatter_class=HelpFormatter)
        module.add_arguments(child)
        if name in PROGRESS_COMMANDS:
            child.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                               help="progress bars on stderr (default: only when stderr is a terminal)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    drop_checkout_root()  # before any command imports transformers (app/import_path.py)
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    module = importlib.import_module(f"pie_server.app.commands.{args.command}")
    progress = getattr(args, "progress", None)
    if progress is None:
        return int(module.main(args) or 0)
    # Through the environment, so that the processes the command starts (engine core, front ends) follow it;
    # restored afterwards for callers that run commands in-process (tests).
    previous = os.environ.get(PROGRESS_ENV_VAR)
    os.environ[PROGRESS_ENV_VAR] = "1" if progress else "0"
    try:
        return int(module.main(args) or 0)
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV_VAR, None)
        else:
            os.environ[PROGRESS_ENV_VAR] = previous


def _overview(modules: dict[str, ModuleType]) -> str:
    width = max(map(len, modules)) + 2
    return "\n\n".join(f"{title}:\n" + "\n".join(f"  {name:<{width}}{modules[name].SUMMARY}" for name in names)
                       for title, names in COMMAND_GROUPS)


def _version() -> str:
    try:
        return importlib.metadata.version("pie-server")
    except importlib.metadata.PackageNotFoundError:  # the checkout on PYTHONPATH, not installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())

"""Who this instance is and what it was launched with."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import NoReturn

from wit_world.imports import runtime

from .errors import UsageError
from .messaging import send


def args() -> list[str]:
    """The launch arguments (argv without a program name)."""
    return list(runtime.arguments())


def instance_id() -> str:
    return runtime.instance_id()


def api_version() -> str:
    """The inferlet API version the host implements, e.g. "0.1.0"."""
    return runtime.version()


HELP_WIDTH = 78  # what argparse's HelpFormatter uses without a terminal (80 columns less 2)


class HelpRequested(Exception):
    """--help was given: the help text went to the client; the inferlet should end normally."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for inferlets: bad arguments raise UsageError (the launch fails with the usage text)
    instead of exiting the process, and --help sends the help text to the client."""

    def __init__(self, prog: str = "inferlet", **kwargs: object) -> None:
        # argparse makes a help formatter for every add_argument; by default each one asks the environment for
        # a terminal's width and colours (a dozen lookups, ~1/4 of the guest's Python calls in a react-agent
        # task). An inferlet has no terminal: plain text, 80 columns, as argparse falls back to anyway.
        kwargs.setdefault("formatter_class", functools.partial(argparse.HelpFormatter, width=HELP_WIDTH))
        if sys.version_info >= (3, 14):
            kwargs.setdefault("color", False)
        super().__init__(prog=prog, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.format_usage().strip()}\n{self.prog}: error: {message}")

    def print_help(self, file: object = None) -> None:
        send(self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise UsageError(message or f"{self.prog}: exit status {status}")
        raise HelpRequested()


def _warm_up_argparse() -> None:
    """componentize-py bundles only the modules imported while it builds (it snapshots the interpreter);
    argparse imports several lazily (gettext, locale, shutil, ...). Exercising it at import time, with no
    host call, makes them part of the component."""
    parser = ArgumentParser(prog="warm-up", description="warm-up")
    parser.add_argument("--count", type=int, default=0, help="a number")
    parser.add_argument("--flag", action="store_true")
    parser.parse_args(["--count", "1", "--flag"])
    parser.format_help()
    try:
        parser.parse_args(["--count", "x"])
    except UsageError:
        pass


_warm_up_argparse()

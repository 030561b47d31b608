"""docs/configuration.md against the real `pie serve` parser (app/commands/serve.py add_arguments plus what
app/cli.py adds): every flag documented, no flag documented that the parser lacks, and each documented default
the parser's own, so the page cannot drift from the code."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pie_server.app.cli import build_parser
from pie_server.app.commands import serve

# Flags whose default depends on the device: the page gives both values, which must be the resolver's.
DEVICE_DEFAULTS = {"--api-processes": serve._num_front_ends}

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_ROW = re.compile(r"^\| (`--[^|]*`) \| ([^|]*) \|", re.M)  # a flags table row: flag cell, default cell
_FLAG = re.compile(r"`(--[a-z0-9-]+)")


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _actions() -> dict[str, argparse.Action]:
    """Each long flag of `pie serve` -> its action (help excluded)."""
    return {flag: action for action in _serve_parser()._actions if not isinstance(action, argparse._HelpAction)
            for flag in action.option_strings if flag.startswith("--")}


def _documented() -> dict[str, str]:
    """Each flag in the page's flag tables -> its default cell."""
    rows = _ROW.findall(CONFIGURATION.read_text())
    return {flag: default.strip() for cell, default in rows for flag in _FLAG.findall(cell)}


def _spelled(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_serve_flag_is_documented_and_nothing_else() -> None:
    actions, documented = _actions(), _documented()
    assert {"--model", "--port", "--api-processes", "--progress", "--no-progress"} <= set(actions)
    assert sorted(set(actions) - set(documented)) == [], "flags missing from docs/configuration.md"
    assert sorted(set(documented) - set(actions)) == [], "docs/configuration.md documents flags pie serve lacks"


@pytest.mark.parametrize("flag", sorted(_actions()))
def test_each_documented_default_is_the_parsers(flag: str) -> None:
    action, cell = _actions()[flag], _documented()[flag]
    if isinstance(action, argparse._StoreTrueAction):
        assert cell.startswith("off"), cell
    elif flag in DEVICE_DEFAULTS:
        resolve = DEVICE_DEFAULTS[flag]
        assert f"`{resolve(None, 'cpu')}` on CPU" in cell and f"`{resolve(None, 'cuda')}` on CUDA" in cell, cell
    elif action.default not in (None, [], ()) and not isinstance(action, argparse.BooleanOptionalAction):
        assert f"`{_spelled(action.default)}`" in cell, f"{flag}: the parser's default is {action.default!r}"
    else:  # no fixed value: the cell says what happens instead, never a number the parser does not have
        assert not re.search(r"`\d", cell), cell

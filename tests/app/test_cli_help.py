"""`pie --help` and every subcommand's --help: they exit 0, list what they should, and every example they show
parses with the command's own parser (an example that drifts from the flags fails here)."""
from __future__ import annotations

import importlib
import os
import shlex

import pytest

from pie_server.app.cli import COMMAND_GROUPS, EXAMPLES, build_parser, main
from pie_server.engine.progress import ENV_VAR

COMMANDS = [name for _, names in COMMAND_GROUPS for name in names]


def _help(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _examples(text: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def test_pie_help_lists_every_command_in_its_group(capsys: pytest.CaptureFixture) -> None:
    text = _help(capsys)
    assert text.startswith("usage: pie [-h] [--version] COMMAND ...")
    positions = [text.index(f"\n  {name} ") for name in COMMANDS]
    assert positions == sorted(positions)  # the order of COMMAND_GROUPS
    for title, names in COMMAND_GROUPS:
        assert text.index(f"\n{title}:\n") < text.index(f"\n  {names[0]} ")
    for name in COMMANDS:
        summary = importlib.import_module(f"pie_server.app.commands.{name}").SUMMARY
        assert f"  {name} " in text and summary in text and "\n" not in summary
    assert "examples:\n  pie serve" in text


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_a_description_and_examples_that_parse(name: str, capsys: pytest.CaptureFixture) -> None:
    module = importlib.import_module(f"pie_server.app.commands.{name}")
    text = _help(capsys, name)
    assert text.startswith(f"usage: pie {name} ")
    assert " ".join(module.DESCRIPTION.split()[:6]) in " ".join(text.split())
    assert "examples:\n" + module.EXAMPLES in text
    examples = _examples(module.EXAMPLES)
    assert len(examples) >= 2
    parser = build_parser()
    for argv in examples:
        assert argv[:2] == ["pie", name]
        assert parser.parse_args(argv[1:]).command == name


def test_the_overview_examples_parse() -> None:
    parser = build_parser()
    examples = _examples(EXAMPLES)
    assert {argv[1] for argv in examples} >= {"serve", "build", "run", "upload", "bench"}
    for argv in examples:
        parser.parse_args(argv[1:])


def test_pie_alone_prints_the_help(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "serve and measure:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("pie 0.")


@pytest.mark.parametrize("flag, expected", [("--progress", "1"), ("--no-progress", "0"), (None, None)])
def test_the_progress_choice_reaches_the_command_through_the_environment(
        flag: str | None, expected: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `pie serve` starts (engine core, front ends) reads $PIE_PROGRESS; it is restored afterwards."""
    from pie_server.app.commands import bench

    monkeypatch.delenv(ENV_VAR, raising=False)
    seen = []
    monkeypatch.setattr(bench, "main", lambda args: seen.append(os.environ.get(ENV_VAR)) or 0)
    assert main(["bench", "--model", "m", *([flag] if flag else [])]) == 0
    assert seen == [expected] and ENV_VAR not in os.environ

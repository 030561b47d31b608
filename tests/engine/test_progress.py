"""engine/progress.py: bars only where someone watches (a terminal, or $PIE_PROGRESS=1), never otherwise."""
from __future__ import annotations

import io
import sys
import time

import pytest

from pie_server.engine.progress import ENV_VAR, progress_bar, progress_spinner, show_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, tty, enabled, expected", [
    (None, False, True, False),  # a pipe, a log file, pytest's capture
    (None, True, True, True),
    (None, True, False, False),  # the caller said never
    ("1", False, True, True),
    ("0", True, True, False),
    ("1", False, False, False),
    ("maybe", True, True, True),  # an unknown value: as if unset
])
def test_show_progress(env: str | None, tty: bool, enabled: bool, expected: bool,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    monkeypatch.setattr(sys, "stderr", _Terminal() if tty else io.StringIO())
    assert show_progress(enabled) is expected


def test_a_bar_draws_nothing_on_a_pipe(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert list(progress_bar("counting", range(3))) == [0, 1, 2]
    with progress_spinner("waiting"):
        time.sleep(0.01)
    assert capsys.readouterr().err == ""


def test_the_spinner_shows_the_elapsed_time_while_the_step_blocks(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    with progress_spinner("building x"):
        time.sleep(1.2)  # a blocking step: only the spinner's thread redraws
    drawn = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert drawn[0] == "building x: 00:00"
    assert "building x: 00:01" in drawn and len(drawn) >= 3

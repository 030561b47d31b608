"""PIE_REQUEST_TRACE: one line per streamed request with its phases in order (app/request_trace.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import openai
import pytest

from pie_server.app.request_trace import PHASES
from tests.app.server_thread import ServerThread


def test_each_request_writes_its_phases_in_order(make_fake_server: Callable[..., ServerThread], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_REQUEST_TRACE", str(tmp_path / "trace"))
    server = make_fake_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for _ in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True) if c.choices)
        assert text
    [path] = tmp_path.glob("trace.*")
    assert path.name == f"trace.{os.getpid()}"  # this process's file (the server runs in a thread here)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line.pop("in_flight") == 1  # this request, alone
        assert 0 < line.pop("arrival_s") <= time.monotonic()  # the machine's monotonic clock, in seconds
        assert list(line) == list(PHASES)  # the fake inferlet marks what the runtime's generate path does
        times = [line[p] for p in PHASES]
        assert times == sorted(times) and times[0] >= 0


def _summary(path: Path) -> list[str]:
    script = Path(__file__).resolve().parents[2] / "scripts" / "trace_summary.py"
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_summary_splits_the_time_to_first_token_by_phase(tmp_path: Path) -> None:
    """Spans between consecutive phases per load band; the runtime's phases only where every line has them."""
    line = {"in_flight": 1, "arrival_s": 5.0, "slot": 1.0, "launched": 2.0, "prompt": 4.0, "admitted": 5.0,
            "submitted": 8.0, "received": 16.0, "first_token": 32.0}
    (tmp_path / "trace.1").write_text(json.dumps(line) + "\n" + json.dumps({**line, "in_flight": 20}) + "\n")
    header, columns, one, _, busy, _ = _summary(tmp_path / "trace")
    assert header.startswith("2 requests") and columns.split()[3:] == list(PHASES)
    assert [float(v) for v in one.split()[2::3]] == [1.0, 1.0, 2.0, 1.0, 3.0, 8.0, 16.0]
    assert busy.split()[:2] == ["9-32", "1"]
    untraced = {k: v for k, v in line.items() if k not in ("submitted", "received")}  # no `generate` call
    (tmp_path / "trace.2").write_text(json.dumps(untraced) + "\n")
    _, columns, one, _, _, _ = _summary(tmp_path / "trace")
    assert columns.split()[3:] == ["slot", "launched", "prompt", "admitted", "first_token"]
    assert one.split()[:2] == ["1", "2"] and float(one.split()[-3]) == 27.0


def test_the_summary_shows_where_the_slowest_tenth_waited(tmp_path: Path) -> None:
    """Below each band, the requests whose first token came at or after the band's p90: here the one whose
    start (launched -> prompt) took 100 ms more than the other nine's."""
    fast = {"in_flight": 12, "arrival_s": 1.0, "slot": 1.0, "launched": 2.0, "prompt": 5.0, "admitted": 6.0,
            "submitted": 7.0, "received": 17.0, "first_token": 18.0}
    slow = {**fast, **{p: fast[p] + 100.0 for p in PHASES[2:]}}
    (tmp_path / "trace.1").write_text("".join(json.dumps(r) + "\n" for r in [fast] * 9 + [slow]))
    _, _, band, tail = _summary(tmp_path / "trace")
    assert band.split()[:2] == ["9-32", "10"] and tail.split()[:2] == ["tail", "1"]
    assert [float(v) for v in tail.split()[2::3]] == [1.0, 1.0, 103.0, 1.0, 1.0, 10.0, 1.0]

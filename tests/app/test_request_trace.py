"""PIE_REQUEST_TRACE: one line per streamed request with its phases in order (app/request_trace.py)."""
from __future__ import annotations

import json
import os
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
        assert list(line) == list(PHASES)
        times = [line[p] for p in PHASES]
        assert times == sorted(times) and times[0] >= 0

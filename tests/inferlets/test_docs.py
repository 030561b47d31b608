"""Every complete inferlet in docs/tutorial.md (code blocks starting with `# tutorial: NAME`) runs on the fake
host (tests/inferlets/fake_host.py), so the tutorial cannot drift from the SDK's API."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.inferlets.fake_host import FakeHost, load_sdk

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"
_BLOCK = re.compile(r"```python\n# tutorial: (\S+)\n(.*?)```", re.S)


def _programs() -> dict[str, str]:
    return {name: code for name, code in _BLOCK.findall(TUTORIAL.read_text())}


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return load_sdk(tmp_path_factory.mktemp("bindings"))


def _run(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str, arguments: list[str],
         inbox: list[str] = ()) -> FakeHost:  # type: ignore[assignment]
    host = FakeHost(arguments=arguments, inbox=list(inbox))
    host.install(monkeypatch)
    sdk.model_info.cache_clear()
    namespace: dict[str, Any] = {"__name__": name.removesuffix(".py")}
    exec(compile(_programs()[name], name, "exec"), namespace)
    sdk.export(namespace["main"])().run()  # raises componentize_py_types.Err if the inferlet failed
    return host


def _text(host: FakeHost, channel: int = 0) -> str:
    return "".join(t for ch, t in host.sent if ch == channel)


def test_the_tutorial_has_its_programs() -> None:
    assert set(_programs()) == {"complete.py", "story.py", "three_answers.py", "chat.py", "confident.py"}


def test_complete(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _run(sdk, monkeypatch, "complete.py", ["The", "capital", "of", "France", "is"])
    assert len(_text(host)) == 24


def test_story(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(_text(_run(sdk, monkeypatch, "story.py", ["--topic", "a lighthouse keeper"]))) == 80
    assert "--topic TOPIC" in _text(_run(sdk, monkeypatch, "story.py", ["--help"]))


def test_three_answers_share_the_prompt(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _run(sdk, monkeypatch, "three_answers.py", ["Name", "a", "color."])
    events = [json.loads(e) for e in host.events]
    assert [e["answer"] for e in events] == [0, 1, 2] and all(len(e["text"]) == 40 for e in events)
    assert host.calls.count("share") == 3


def test_chat_fills_only_the_new_turns(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _run(sdk, monkeypatch, "chat.py", [], inbox=["Hi!", "Again.", "/bye"])
    assert host.calls.count("generate") == 2 and "free" not in host.calls  # never started over
    assert _text(host).count("\n") == 2 and len(_text(host)) == 2 * 64 + 2


def test_confident_stops_when_unsure(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    sure = _run(sdk, monkeypatch, "confident.py", ["--prompt", "hi", "--max-tokens", "5"])
    assert json.loads(sure.events[0])["probs"] == [0.9] * 5 and len(_text(sure)) == 5
    unsure = _run(sdk, monkeypatch, "confident.py", ["--prompt", "hi", "--min-prob", "0.95"])
    assert json.loads(unsure.events[0])["probs"] == [] and _text(unsure) == ""

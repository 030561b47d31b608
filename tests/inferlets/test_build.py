"""`pie build` and app/inferlet_build.py: source validation (before the slow componentize-py step), the
content-hash cache key, and `pie run`'s argument handling. No component is built here (see the e2e tests)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pie_server.app import cli
from pie_server.app import inferlet_build
from pie_server.app.inferlet_build import BuildError, build_inferlet, find_source, is_cached, source_hash

MAIN = "def main(args: list[str]) -> None:\n    pass\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_pie_build_errors_clearly_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.py"
    assert cli.main(["build", str(missing), "-o", str(tmp_path / "out.wasm")]) == 1
    assert f"pie build: error: {missing}: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out.wasm").exists()


@pytest.mark.parametrize("name, text, message", [
    ("notes.txt", MAIN, "is a .py file or a folder"),
    ("nomain.py", "x = 1\n", "define the entry point `def main"),
    ("broken.py", "def main(args):\n    x = (\n", "broken.py:2: syntax error"),
    ("pie_sdk.py", MAIN, "cannot be the inferlet's module name"),
    ("my-app.py", MAIN, "cannot be the inferlet's module name"),
])
def test_bad_sources_are_refused_before_building(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build_inferlet(_write(tmp_path / name, text), tmp_path / "out.wasm", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_folder_needs_main_py_and_brings_its_modules(tmp_path: Path) -> None:
    folder = tmp_path / "agent"
    _write(folder / "helpers.py", "X = 1\n")
    with pytest.raises(BuildError, match="has no main.py"):
        find_source(folder)
    _write(folder / "main.py", "from helpers import X\n" + MAIN)
    _write(folder / "tools" / "__init__.py", "")
    _write(folder / "__pycache__" / "junk.py", "")
    source = find_source(folder)
    assert (source.module, source.name) == ("main", "agent")
    assert [p.as_posix() for p in source.files] == ["helpers.py", "main.py", "tools/__init__.py"]
    alone = find_source(_write(tmp_path / "solo.py", MAIN))
    assert (alone.module, alone.name, alone.files) == ("solo", "solo", (Path("solo.py"),))


def test_the_cache_key_covers_every_source_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "app"
    _write(folder / "main.py", MAIN)
    helper = _write(folder / "helper.py", "A = 1\n")
    first = source_hash(find_source(folder))
    assert source_hash(find_source(folder)) == first
    helper.write_text("A = 2\n")
    assert source_hash(find_source(folder)) != first
    helper.write_text("A = 1\n")
    assert source_hash(find_source(folder)) == first
    monkeypatch.setattr(inferlet_build, "_ENTRY_TEMPLATE", inferlet_build._ENTRY_TEMPLATE + "\n")
    assert source_hash(find_source(folder)) != first  # the generated entry module counts too
    monkeypatch.undo()
    assert not is_cached(folder, cache_dir=tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{first}.wasm").write_bytes(b"\0asm")
    assert is_cached(folder, cache_dir=tmp_path / "cache")
    out = build_inferlet(folder, tmp_path / "out" / "app.wasm", cache_dir=tmp_path / "cache")
    assert out.read_bytes() == b"\0asm"  # served from the cache, componentize-py never ran


def test_pie_run_takes_options_after_the_inferlet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.wasm"
    status = cli.main(["run", str(missing), "--page-size", "16", "--", "--prompt", "Hi", "--max-tokens", "4"])
    assert status == 2 and f"{missing}: no such file or folder" in capsys.readouterr().err
    assert cli.main(["run", str(missing), "--page-size", "3", "--", "--prompt", "Hi"]) == 2
    assert "page_size must be a positive power of two" in capsys.readouterr().err

"""engine/runtime/programs.py: the compiled-component cache on disk, bounded by size with LRU eviction."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import wasmtime

from pie_server.engine.runtime.messages import Terminated, Text
from pie_server.engine.runtime.programs import ProgramCache
from tests.engine.runtime.conftest import make_runtime, wat
from tests.engine.runtime.fakes import FakeControl

ENGINE_KEY = "test-engine"


def _programs(num: int) -> list[bytes]:
    """Distinct small components of about the same compiled size."""
    return [wat("forward_loop.wat", NUM_STEPS=10 + i) for i in range(num)]


def _artifact_size(tmp_path: Path, wasm: bytes) -> int:
    cache = ProgramCache(wasmtime.Engine(), tmp_path / "measure", ENGINE_KEY)
    return cache.artifact_path(cache.load(wasm)).stat().st_size


def _cached(folder: Path) -> set[Path]:
    return set(folder.glob("*.cwasm"))


def test_the_least_recently_used_artifact_goes_first(tmp_path: Path) -> None:
    a, b, c = _programs(3)
    size = max(_artifact_size(tmp_path, w) for w in (a, b, c))
    cache = ProgramCache(wasmtime.Engine(), tmp_path / "cache", ENGINE_KEY, max_bytes=2 * size + size // 2)
    hash_a, hash_b = cache.load(a), cache.load(b)
    cache.get(hash_a)  # a launch of a: now b is the least recently used
    hash_c = cache.load(c)
    assert _cached(tmp_path / "cache") == {cache.artifact_path(hash_a), cache.artifact_path(hash_c)}
    assert cache.num_evicted == 1
    with pytest.raises(KeyError):  # dropped from memory too: this process keeps no mapping of it
        cache.get(hash_b)
    assert cache.load(b) == hash_b and cache.num_compiled == 4  # loading it again compiles it again
    assert not cache.artifact_path(hash_a).exists()  # and a, now the oldest, made room for it
    assert sum(p.stat().st_size for p in _cached(tmp_path / "cache")) <= cache.max_bytes


def test_the_newest_artifact_stays_even_alone_over_the_bound(tmp_path: Path) -> None:
    a, b = _programs(2)
    cache = ProgramCache(wasmtime.Engine(), tmp_path / "cache", ENGINE_KEY, max_bytes=1)
    cache.load(a)
    hash_b = cache.load(b)
    assert _cached(tmp_path / "cache") == {cache.artifact_path(hash_b)}
    assert cache.get(hash_b) is not None


def test_a_lower_bound_applies_at_start_and_stale_temporary_files_go(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    unbounded = ProgramCache(wasmtime.Engine(), folder, ENGINE_KEY)
    hashes = [unbounded.load(w) for w in _programs(3)]
    stale = folder / "leftover.tmp123-456"
    stale.write_bytes(b"x" * 10)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = folder / "writing.tmp789-1"  # another process may be writing it now
    fresh.write_bytes(b"y")
    size = unbounded.artifact_path(hashes[0]).stat().st_size
    ProgramCache(wasmtime.Engine(), folder, ENGINE_KEY, max_bytes=size + size // 2)
    assert _cached(folder) == {unbounded.artifact_path(hashes[2])}  # the most recently written
    assert not stale.exists() and fresh.exists()


def test_an_artifact_another_process_removed_is_a_miss_never_an_error(tmp_path: Path) -> None:
    (a,) = _programs(1)
    cache = ProgramCache(wasmtime.Engine(), tmp_path / "cache", ENGINE_KEY)
    program = cache.load(a)
    cache.artifact_path(program).unlink()  # evicted by another front end
    assert cache.get(program) is not None  # this launch still runs from memory ...
    with pytest.raises(KeyError):  # ... but the mapping of the removed file is let go
        cache.get(program)
    assert cache.load(a) == program and cache.num_compiled == 2

    cache.get(program)
    cache.artifact_path(program).unlink()
    assert cache.load(a) == program  # in memory: written back from there, not compiled again
    assert cache.num_compiled == 2 and cache.artifact_path(program).exists()


def test_a_running_instance_outlives_the_eviction_of_its_code(control: FakeControl, tmp_path: Path) -> None:
    """The component in memory maps its file; removing the file does not disturb the mapping."""
    echo = wat("messages.wat")
    runtime = make_runtime(control, tmp_path, compile_cache_bytes=1)  # every write evicts all older ones
    try:
        program = runtime.load(echo)
        handle = runtime.launch(program)
        assert handle.get_message(timeout=10) == Text("hello")
        for other in _programs(2):
            runtime.load(other)
        assert not runtime.programs.artifact_path(program).exists()
        handle.send("still here")
        assert handle.messages(timeout=10)[-2:] == [Text("still here"), Terminated(ok=True)]
        with pytest.raises(KeyError):
            runtime.launch(program)
        assert runtime.load(echo) == program
        assert runtime.launch(program).get_message(timeout=10) == Text("hello")
    finally:
        runtime.close()

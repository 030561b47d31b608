"""engine/gc_pauses.py: the heap frozen at start-up, and PIE_GC_WARN_MS's log of long collections."""
from __future__ import annotations

import gc
import logging

import pytest

from pie_server.engine import gc_pauses


@pytest.fixture(autouse=True)
def _restore_gc():  # noqa: ANN202
    callbacks = list(gc.callbacks)
    yield
    gc.callbacks[:] = callbacks
    gc.unfreeze()


def test_freeze_heap_moves_what_is_alive_out_of_the_collector_s_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gc_pauses.ENV_VAR, raising=False)
    kept = [[i] for i in range(1000)]
    gc_pauses.freeze_heap()
    assert gc.get_freeze_count() >= len(kept)
    assert not any(isinstance(c, gc_pauses._Watch) for c in gc.callbacks)  # unset: nothing watched


def test_collections_over_the_threshold_are_logged(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(gc_pauses.ENV_VAR, "0")
    gc_pauses.freeze_heap()
    gc_pauses.watch(0.0)  # a second call keeps one watch
    assert sum(isinstance(c, gc_pauses._Watch) for c in gc.callbacks) == 1
    with caplog.at_level(logging.WARNING, logger=gc_pauses.__name__):
        gc.collect()
    assert any("garbage collection of generation 2 took" in r.getMessage() for r in caplog.records)
    gc_pauses.watch(1e9)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=gc_pauses.__name__):
        gc.collect()
    assert not caplog.records


@pytest.mark.parametrize("raw", ["fast", "-1"])
def test_a_bad_threshold_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(gc_pauses.ENV_VAR, raw)
    with pytest.raises(ValueError, match=gc_pauses.ENV_VAR):
        gc_pauses.warn_threshold_ms()


def test_recording_gives_each_collection_s_generation_and_length() -> None:
    with gc_pauses.recording() as pauses:
        gc.collect(1)
        gc.collect()
    gc.collect()  # after the block: not recorded
    assert [generation for generation, _ in pauses] == [1, 2] and all(s >= 0 for _, s in pauses)
    assert not any(isinstance(c, gc_pauses._Timer) and not isinstance(c, gc_pauses._Watch) for c in gc.callbacks)

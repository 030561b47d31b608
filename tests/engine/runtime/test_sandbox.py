"""A misbehaving instance ends alone, with a clear error, and all its pages come back."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from pie_server.engine.runtime.messages import Terminated, Text
from pie_server.engine.runtime.scheduler import describe_trap
from tests.engine.runtime.conftest import make_runtime, wat
from tests.engine.runtime.fakes import FakeControl


def _run_next_to_good(control: FakeControl, tmp_path: Path, bad_wasm: bytes, bad_budget_s: float | None = None,
                      **config: object) -> Terminated:
    runtime = make_runtime(control, tmp_path, **config)
    try:
        good = runtime.launch(runtime.load(wat("forward_loop.wat", NUM_STEPS=50)))
        bad = runtime.launch(runtime.load(bad_wasm), time_budget_s=bad_budget_s)
        bad_end = bad.messages(timeout=30)[-1]
        good_messages = good.messages(timeout=30)
        assert good_messages == [Text("done"), Terminated(ok=True)], "the good instance must not notice"
        assert isinstance(bad_end, Terminated) and not bad_end.ok
        assert runtime.num_instances == 0
    finally:
        runtime.close()
    assert control.num_free_pages == control.info.num_pages
    assert bad.id in control.closed and good.id in control.closed
    return bad_end


def test_trap_ends_only_its_instance(control: FakeControl, tmp_path: Path) -> None:
    end = _run_next_to_good(control, tmp_path, wat("trap.wat"))
    assert end.error == "trapped: wasm trap: wasm `unreachable` instruction executed"  # no Wasm backtrace


def test_a_trap_message_quotes_the_guests_last_output_not_the_backtrace() -> None:
    text = ("error while executing at wasm backtrace:\n    0:     0x38 - M!<wasm function 0>\n\nCaused by:\n"
            "    wasm trap: wasm `unreachable` instruction executed\n")
    panic = b"starting\n" + b"x" * 1000 + b"\nthread panicked at src/lib.rs:3: boom\n"
    message = describe_trap(text, panic)
    assert message.startswith("trapped: wasm trap: wasm `unreachable` instruction executed (its last output: ")
    assert message.endswith("thread panicked at src/lib.rs:3: boom)") and "starting" not in message
    assert "0x38" not in message and describe_trap(text, b"") == message.split(" (its")[0]


def test_infinite_loop_is_stopped_at_its_time_budget(control: FakeControl, tmp_path: Path) -> None:
    end = _run_next_to_good(control, tmp_path, wat("infinite_loop.wat"), bad_budget_s=1.0)
    assert end.error is not None and "time budget" in end.error


def test_the_epoch_ticker_sleeps_while_no_instance_lives(control: FakeControl, tmp_path: Path) -> None:
    """An idle server does not wake every epoch tick (5 ms); a live instance gets its ticks (its yields and its
    time budget depend on them)."""
    runtime = make_runtime(control, tmp_path)
    scheduler, ticks = runtime._scheduler, [0]
    engine = scheduler.engine

    class CountingEngine:
        def increment_epoch(self) -> None:
            ticks[0] += 1
            engine.increment_epoch()

    try:
        scheduler.engine = CountingEngine()
        time.sleep(0.3)
        assert ticks[0] <= 1  # (one tick may have been under way)
        end = runtime.launch(runtime.load(wat("infinite_loop.wat")), time_budget_s=0.5).messages(timeout=30)[-1]
        assert isinstance(end, Terminated) and "time budget" in (end.error or "")
        assert ticks[0] >= 20  # 0.5 s of 5 ms ticks, give or take a loaded machine
        time.sleep(0.05)
        idle = ticks[0]
        time.sleep(0.3)
        assert ticks[0] - idle <= 1
    finally:
        runtime.close()


def test_memory_bomb_hits_the_limit_and_traps(control: FakeControl, tmp_path: Path) -> None:
    end = _run_next_to_good(control, tmp_path, wat("memory_bomb.wat"), memory_limit_bytes=32 << 20)
    assert end.error is not None and end.error.startswith("trapped:")


def test_invalid_page_id_is_an_error_returned_to_the_guest(control: FakeControl, tmp_path: Path) -> None:
    # forward_loop with its page id replaced by one it never allocated: the host answers err(...), and the
    # fixture returns that string as run()'s error.
    bad = (Path(__file__).parent / "wat" / "forward_loop.wat").read_text().replace(
        "(i32.store (i32.const 208) (i32.load (i32.load (i32.const 132))))",
        "(i32.store (i32.const 208) (i32.const 999))").replace("NUM_STEPS", "5")
    import wasmtime
    end = _run_next_to_good(control, tmp_path, wasmtime.wat2wasm(bad))
    assert end.error is not None and "inferlet returned an error" in end.error and "999" in end.error


@pytest.mark.parametrize("steps", [1, 30])
def test_pages_are_freed_after_a_normal_end(control: FakeControl, tmp_path: Path, steps: int) -> None:
    runtime = make_runtime(control, tmp_path)
    try:
        handle = runtime.launch(runtime.load(wat("forward_loop.wat", NUM_STEPS=steps)))
        assert handle.messages(timeout=30)[-1] == Terminated(ok=True)
    finally:
        runtime.close()
    assert len([c for i, c in control.commands if i == handle.id]) == steps
    assert control.num_free_pages == control.info.num_pages

"""Hostile inferlets next to well-behaved ones, and a KV pool far too small for its load (issue 14).

Real runtime, control layer and executor (tiny random Llama, CPU). The attackers are the SDK-built
tests/inferlets/hostile component (built once per session) and the hand-written WAT modules of
tests/engine/runtime/wat. Every attack must end with a clear error for the attacker alone; greedy runs
launched beside it produce exactly the tokens they produce alone; afterwards every page is free."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pie_server.app.inferlet_build import build_inferlet, default_cache_dir
from pie_server.engine.config import EngineConfig
from pie_server.engine.control.config import DEFAULT_MAX_PAGE_IDS
from pie_server.engine.engine import Engine
from pie_server.engine.runtime.config import InstanceLimits, RuntimeConfig
from pie_server.engine.runtime.messages import Event, Message, Terminated, Text
from pie_server.engine.runtime.runtime import InstanceHandle
from tests.engine.runtime.conftest import wat

HOSTILE_DIR = Path(__file__).resolve().parent / "hostile"
PAGE_SIZE = 16
NUM_PAGES = 96
MAX_PAGES_PER_INSTANCE = 24  # the quota every instance of `engine` runs under
MAX_OUTBOX_BYTES = 64 << 10
PROMPT = "The capital of France is"
NUM_GOOD_TOKENS = 12
TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def hostile_wasm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_inferlet(HOSTILE_DIR, tmp_path_factory.mktemp("hostile") / "hostile.wasm", progress=False).read_bytes()


def _start(model_dir: Path, num_pages: int, swap_space_gib: float | None = None, **runtime: Any) -> Engine:
    config = EngineConfig(device="cpu", dtype="float32", page_size=PAGE_SIZE, num_pages=num_pages,
                          swap_space_gib=swap_space_gib)
    runtime_config = RuntimeConfig(cache_dir=str(default_cache_dir().parent / "compiled"), time_budget_s=60.0,
                                   **runtime)
    return Engine.start(model_dir, config, runtime_config=runtime_config, progress=False)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[Engine]:
    started = _start(tiny_llama_dir, NUM_PAGES, max_pages_per_instance=MAX_PAGES_PER_INSTANCE,
                     max_outbox_bytes=MAX_OUTBOX_BYTES, http_allowed_hosts=("allowed.invalid",))
    yield started
    started.close()


@pytest.fixture(scope="module")
def program(engine: Engine, hostile_wasm: bytes) -> str:
    return engine.runtime.load(hostile_wasm)


@pytest.fixture(scope="module")
def alone(engine: Engine, program: str) -> list[int]:
    """The well-behaved run's greedy tokens with nothing else running."""
    return _tokens(engine.runtime.launch(program, _good_args(PROMPT, NUM_GOOD_TOKENS)).messages(TIMEOUT_S))


@pytest.fixture(autouse=True)
def all_pages_free_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("engine", "tiny_pool"):
        if name in request.fixturenames:
            stats = request.getfixturevalue(name).control.stats()
            assert (stats.num_free_pages, stats.num_instances) == (stats.num_pages, 0)


def _good_args(prompt: str, num_tokens: int) -> list[str]:
    return ["good", "--prompt", prompt, "--max-tokens", str(num_tokens)]


def _events(messages: list[Message]) -> list[dict[str, Any]]:
    return [json.loads(m.json) for m in messages if isinstance(m, Event)]


def _end(messages: list[Message]) -> Terminated:
    end = messages[-1]
    assert isinstance(end, Terminated)
    return end


def _tokens(messages: list[Message]) -> list[int]:
    assert _end(messages).ok, messages[-1]
    [report] = _events(messages)
    return report["token_ids"]


def _next_event(handle: InstanceHandle) -> dict[str, Any]:
    message = handle.get_message(TIMEOUT_S)
    assert isinstance(message, Event), message
    return json.loads(message.json)


def _good_runs_beside(engine: Engine, program: str, alone: list[int], num_runs: int = 2) -> None:
    """Well-behaved runs launched now (while an attacker runs) give exactly their uncontended tokens."""
    handles = [engine.runtime.launch(program, _good_args(PROMPT, NUM_GOOD_TOKENS)) for _ in range(num_runs)]
    assert [_tokens(h.messages(TIMEOUT_S)) for h in handles] == [alone] * num_runs


# -- sandbox: the WAT attackers ------------------------------------------------------------------------------

def test_a_trap_keeps_its_reason_for_the_client_and_logs_the_backtrace(
        engine: Engine, program: str, alone: list[int], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pie_server.engine.runtime.scheduler"):
        attacker = engine.runtime.launch(engine.runtime.load(wat("trap.wat")))
        _good_runs_beside(engine, program, alone)
        end = _end(attacker.messages(TIMEOUT_S))
    assert end.error == "trapped: wasm trap: wasm `unreachable` instruction executed"
    assert "backtrace" in caplog.text and attacker.id in caplog.text  # for the operator, not the client


def test_an_infinite_loop_is_stopped_at_its_budget_and_others_run_meanwhile(
        engine: Engine, program: str, alone: list[int]) -> None:
    attacker = engine.runtime.launch(engine.runtime.load(wat("infinite_loop.wat")), time_budget_s=3.0)
    started = time.monotonic()
    _good_runs_beside(engine, program, alone)
    assert time.monotonic() - started < 3.0, "the good runs finished while the loop was still spinning"
    end = _end(attacker.messages(TIMEOUT_S))
    assert end.error == "exceeded its time budget of 3 s"


def test_a_memory_bomb_traps_at_its_limit(engine: Engine, program: str, alone: list[int]) -> None:
    attacker = engine.runtime.launch(engine.runtime.load(wat("memory_bomb.wat")),
                                     limits=InstanceLimits(memory_limit_bytes=32 << 20))
    _good_runs_beside(engine, program, alone)
    end = _end(attacker.messages(TIMEOUT_S))
    assert end.error is not None and end.error.startswith("trapped: ") and "backtrace" not in end.error


# -- the SDK attackers ---------------------------------------------------------------------------------------

def test_a_flood_to_a_client_that_does_not_read_waits_within_the_outbox_bound(
        engine: Engine, program: str, alone: list[int]) -> None:
    count, size = 200, 16 << 10  # 3.2 MB sent, 50 times the bound
    attacker = engine.runtime.launch(program, ["flood", "--count", str(count), "--size", str(size)])
    outbox = attacker._state.outbox
    _good_runs_beside(engine, program, alone)  # meanwhile nobody reads the attacker's messages
    deadline = time.monotonic() + 10
    while outbox.num_bytes < MAX_OUTBOX_BYTES and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    held = outbox.num_bytes
    assert MAX_OUTBOX_BYTES <= held <= MAX_OUTBOX_BYTES + size, "the sender waits once the bound is reached"
    assert engine.runtime.num_instances == 1  # suspended in send, not ended
    messages = attacker.messages(TIMEOUT_S)  # the client reads: the flood goes on and ends normally
    assert _end(messages).ok
    assert sum(len(m.text) for m in messages if isinstance(m, Text)) == count * size
    assert _events(messages) == [{"sent": count}]


def test_a_text_over_the_message_limit_is_cut_at_a_character(engine: Engine, program: str) -> None:
    """send has no error channel: a text over max_message_bytes arrives cut to the limit, never mid-character."""
    limit = RuntimeConfig().max_message_bytes
    messages = engine.runtime.launch(program, ["flood", "--count", "1", "--size", str(limit // 3 + 10),
                                               "--char", "\u20ac"]).messages(TIMEOUT_S)  # 3 bytes each
    assert _end(messages).ok
    [text] = [m.text for m in messages if isinstance(m, Text)]
    assert text == "\u20ac" * (limit // 3)  # 1,048,575 bytes: the 1,048,576th byte would split a character


def test_hoarding_pages_stops_at_the_instance_quota(engine: Engine, program: str, alone: list[int]) -> None:
    attacker = engine.runtime.launch(program, ["hoard"])
    report = _next_event(attacker)
    assert report["held"] == MAX_PAGES_PER_INSTANCE and "page quota exceeded" in report["error"]
    _good_runs_beside(engine, program, alone)  # while it holds its pages
    attacker.send("go")
    end = _end(attacker.messages(TIMEOUT_S))
    assert end.error is not None and "page quota exceeded" in end.error


def test_forward_with_pages_it_does_not_hold_is_an_error_value(engine: Engine, program: str,
                                                               alone: list[int]) -> None:
    holder = engine.runtime.launch(program, ["hoard"])  # another instance holding ids 0..23 of its own
    _next_event(holder)
    messages = engine.runtime.launch(program, ["bad-pages"]).messages(TIMEOUT_S)
    assert _end(messages).ok  # every refusal came back as an error value; the instance went on
    [errors] = _events(messages)
    assert errors == {"never": "unknown page id 987654", "freed": "page 0 was already freed",
                      "others": "unknown page id 1"}
    _good_runs_beside(engine, program, alone)
    holder.kill()
    holder.messages(TIMEOUT_S)


def test_importing_another_tenants_export_is_refused(engine: Engine, program: str) -> None:
    exporter = engine.runtime.launch(program, ["export", "--prompt", PROMPT * 5, "--name", "shared"], tenant="alice")
    num_exported = _next_event(exporter)["exported"]
    thief = _end(engine.runtime.launch(program, ["import", "--name", "shared"], tenant="mallory").messages(TIMEOUT_S))
    assert thief.error is not None and "no pages are exported under 'shared'" in thief.error
    friend = engine.runtime.launch(program, ["import", "--name", "shared"], tenant="alice").messages(TIMEOUT_S)
    assert num_exported > 0 and _events(friend) == [{"imported": num_exported // PAGE_SIZE}]  # tokens -> pages
    exporter.send("done")
    assert _end(exporter.messages(TIMEOUT_S)).ok


def test_http_off_the_allow_list_is_refused(engine: Engine, program: str) -> None:
    end = _end(engine.runtime.launch(program, ["http", "--url", "http://example.com/x"]).messages(TIMEOUT_S))
    assert end.error is not None and "host 'example.com' is not on the server's HTTP allow-list" in end.error


def test_a_fork_bomb_stops_at_the_quota(engine: Engine, program: str, alone: list[int]) -> None:
    attacker = engine.runtime.launch(program, ["fork-bomb", "--prompt", PROMPT * 4])  # 1 full page + a partial one
    report = _next_event(attacker)
    assert 0 < report["forks"] < MAX_PAGES_PER_INSTANCE and "page quota exceeded" in report["error"]
    end = _end(attacker.messages(TIMEOUT_S))
    assert end.error is not None and "page quota exceeded" in end.error
    _good_runs_beside(engine, program, alone)


def test_running_out_of_pages_in_generate_all_is_an_error_value(engine: Engine, program: str) -> None:
    """4 contexts of 200 tokens need 52 pages under a quota of 24: the sequences that cannot grow fail, the
    instance does not (types.wit: a host refusal never ends the instance)."""
    messages = engine.runtime.launch(program, ["generate-oom", "--prompt", PROMPT, "--contexts", "4",
                                               "--max-tokens", "200"]).messages(TIMEOUT_S)
    assert _end(messages).ok, messages[-1]
    [report] = _events(messages)
    assert "page quota exceeded" in report["error"] and len(report["after"]) == 2


# -- KV exhaustion ------------------------------------------------------------------------------------------

# The runs' working set (5 x 9 = 45 pages) is twice the device pool but fits the pool plus its host swap space
# (as many slots as pages): all must complete, queued or swapped. Beyond pool + swap the control layer's last
# resort evicts a victim's KV, which the SDK computes again (docs/reliability.md).
TINY_POOL_PAGES = 24
NUM_LONG_RUNS = 5
NUM_LONG_TOKENS = 120  # each run needs 9 pages (prompt + output), which fit alone


@pytest.fixture(scope="module")
def tiny_pool(tiny_llama_dir: Path) -> Iterator[Engine]:
    started = _start(tiny_llama_dir, TINY_POOL_PAGES)
    yield started
    started.close()


@pytest.fixture(scope="module")
def tiny_program(tiny_pool: Engine, hostile_wasm: bytes) -> str:
    return tiny_pool.runtime.load(hostile_wasm)


def test_a_hoarder_without_a_quota_does_not_stall_a_later_request(
        tiny_pool: Engine, tiny_program: str, alone: list[int]) -> None:
    """No per-instance quota (the default): the hoarder takes the whole pool and lingers (its budget is 60 s);
    a request arriving after it gets the pages it lacks from the hoarder's excess over its fair share
    (swapped to host memory: docs/decisions/kv-fair-share.md) and runs as if alone."""
    hoarder = tiny_pool.runtime.launch(tiny_program, ["hoard"])
    report = _next_event(hoarder)
    assert report["held"] == TINY_POOL_PAGES and f"the pool has {TINY_POOL_PAGES}" in report["error"]
    started = time.monotonic()
    good = tiny_pool.runtime.launch(tiny_program, _good_args(PROMPT, NUM_GOOD_TOKENS))
    assert _tokens(good.messages(TIMEOUT_S)) == alone
    elapsed = time.monotonic() - started
    assert not hoarder._state.finished and tiny_pool.control.stats().num_swapped == 1  # it lives, trimmed
    assert elapsed < 10.0, f"the request waited {elapsed:.1f} s for the hoarder"
    hoarder.send("go")
    end = _end(hoarder.messages(TIMEOUT_S))
    assert end.error is not None and f"the pool has {TINY_POOL_PAGES}" in end.error
    print(f"\nbeside a hoarder of all {TINY_POOL_PAGES} pages: {NUM_GOOD_TOKENS} tokens in {elapsed:.2f} s")


def test_a_fork_bomb_without_a_quota_stops_at_the_default_page_id_limit(
        tiny_pool: Engine, tiny_program: str, alone: list[int]) -> None:
    """Forks of full pages take no new page, only page ids: without a quota the control layer's default limit
    of DEFAULT_MAX_PAGE_IDS ids per instance refuses the fork that would pass it (the instance's own error)."""
    num_full_pages = 16
    started = time.monotonic()
    attacker = tiny_pool.runtime.launch(tiny_program, ["fork-bomb", "--full-pages", str(num_full_pages)])
    report = _next_event(attacker)
    elapsed = time.monotonic() - started
    assert report["forks"] == DEFAULT_MAX_PAGE_IDS // num_full_pages - 1  # the parent maps 16 ids too
    assert "page quota exceeded" in report["error"] and f"its limit is {DEFAULT_MAX_PAGE_IDS}" in report["error"]
    end = _end(attacker.messages(TIMEOUT_S))
    assert end.error is not None and "page quota exceeded" in end.error
    good = tiny_pool.runtime.launch(tiny_program, _good_args(PROMPT, NUM_GOOD_TOKENS))
    assert _tokens(good.messages(TIMEOUT_S)) == alone
    print(f"\n{report['forks']} forks refused after {elapsed:.1f} s")


def test_many_long_runs_on_a_tiny_pool_all_complete_with_their_uncontended_output(
        engine: Engine, program: str, tiny_pool: Engine, tiny_program: str) -> None:
    _assert_all_complete_as_alone(engine, program, tiny_pool, tiny_program, NUM_LONG_RUNS, TINY_POOL_PAGES)


def test_a_larger_swap_space_carries_runs_that_want_three_times_pool_and_default_swap(
        engine: Engine, program: str, tiny_llama_dir: Path, hostile_wasm: bytes) -> None:
    """8 runs x 9 pages on a 12-page pool: 72 pages wanted, three times the pool plus its default swap (12
    slots); with --swap-space for 64 pages they all complete without an eviction."""
    num_pages, num_runs = 12, 8
    per_page = engine.executor.info.kv_bytes_per_page  # the same model and page size
    small = _start(tiny_llama_dir, num_pages, swap_space_gib=64 * per_page / (1 << 30))
    try:
        assert small.executor.num_swap_slots == 64
        _assert_all_complete_as_alone(engine, program, small, small.runtime.load(hostile_wasm), num_runs, num_pages)
        assert small.control.stats().num_evictions == 0
    finally:
        small.close()


def test_runs_beyond_pool_and_swap_complete_with_their_kv_evicted_and_computed_again(
        engine: Engine, program: str, tiny_llama_dir: Path, hostile_wasm: bytes) -> None:
    """The same 8 runs x 9 pages on a 12-page pool with the default swap (12 slots): when every holder waits for
    pages and no slot is left, the last resort drops a victim's KV (KV_EVICTED) instead of failing it, and the
    SDK's Context computes it again and continues its generation: all complete as if alone."""
    small = _start(tiny_llama_dir, 12)
    try:
        assert small.executor.num_swap_slots == 12
        _assert_all_complete_as_alone(engine, program, small, small.runtime.load(hostile_wasm), 8, 12)
        assert small.control.stats().num_evictions > 0, "no eviction happened: the last resort was not tested"
    finally:
        small.close()


def _assert_all_complete_as_alone(engine: Engine, program: str, pool: Engine, pool_program: str, num_runs: int,
                                  num_pages: int) -> None:
    tiny_pool, tiny_program = pool, pool_program
    prompts = [f"Story {i}: once upon a time" for i in range(num_runs)]
    expected = [_tokens(engine.runtime.launch(program, _good_args(p, NUM_LONG_TOKENS)).messages(TIMEOUT_S))
                for p in prompts]
    peaks = {"num_waiting": 0, "num_swapped": 0}
    started = time.monotonic()
    handles = [tiny_pool.runtime.launch(tiny_program, _good_args(p, NUM_LONG_TOKENS)) for p in prompts]
    while any(not h._state.finished for h in handles) and time.monotonic() - started < TIMEOUT_S:
        stats = tiny_pool.control.stats()
        for name in peaks:
            peaks[name] = max(peaks[name], getattr(stats, name))
        time.sleep(0.005)
    outputs = [_tokens(h.messages(TIMEOUT_S)) for h in handles]
    elapsed = time.monotonic() - started
    assert outputs == expected  # none failed for lack of pages, none deadlocked, all as if alone
    assert peaks["num_waiting"] > 0 or peaks["num_swapped"] > 0, "the pool was never short: no contention tested"
    print(f"\n{num_runs} runs x {NUM_LONG_TOKENS} tokens on {num_pages} pages: {elapsed:.1f} s, "
          f"peaks {peaks}")

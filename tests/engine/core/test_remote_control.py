"""RemoteControl against an EngineCore over a Controller with the fake executor: the engine core's protocol
(engine/core) in one process (the core's loop on a thread), so every call's answer can be compared with what
the Controller itself does."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from pie_server.engine.control.api import ControlError, VirtualForward, call_later
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import DecodeRequest
from pie_server.engine.core.client import RemoteControl
from pie_server.engine.core.messages import CoreFacts
from pie_server.engine.core.process import core_address_of
from pie_server.engine.core.server import EngineCore
from pie_server.engine.grammar import GrammarSpec, LazyCompiler
from pie_server.engine.step import OutputSpec, SamplingParams
from tests.engine.control.fake_executor import FakeExecutor
from tests.engine.control.byte_grammar import GRAMMARS, VOCAB_SIZE

GREEDY = SamplingParams()


class Core:
    def __init__(self, run_dir: Path, executor: FakeExecutor, grammars: LazyCompiler | None = None) -> None:
        self.controller = Controller(executor, ControlConfig(), grammars)
        self.controller.start()
        facts = CoreFacts(model_name="fake", model_dir=str(run_dir), vocab_size=executor.vocab_size,
                          info=executor.info, admission_pages=self.controller.admission.num_pages,
                          can_decode_grammar=self.controller.can_decode_grammar)
        self.core = EngineCore(self.controller, facts, core_address_of(str(run_dir)))
        self.thread = threading.Thread(target=self.core.serve_forever, daemon=True)
        self.thread.start()
        self.remote = RemoteControl(core_address_of(str(run_dir)), os.getpid(), run_dir, connect_timeout_s=10)

    def close(self) -> None:
        self.remote.close()
        self.core.stop()
        self.thread.join()
        self.core.close()
        self.controller.stop()


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    made = Core(tmp_path, FakeExecutor(num_pages=32, page_size=4))
    yield made
    made.close()
    stats = made.controller.stats()
    assert stats.num_instances == 0 and stats.num_free_pages == stats.num_pages


def test_handshake_reports_the_engine(core: Core) -> None:
    assert core.remote.info == core.controller.info
    assert core.remote.facts.model_name == "fake"
    assert core.remote.admission.num_pages == core.controller.admission.num_pages
    assert not core.remote.can_decode_grammar  # its Controller was given no grammar compiler


def test_forward_and_pages_round_trip(core: Core) -> None:
    remote = core.remote
    remote.open_instance("a")
    pages = remote.allocate_pages("a", 2).result(5)
    assert pages == [0, 1]
    result = remote.forward("a", VirtualForward([5, 6, 7], [0, 1, 2], pages[:1], 3,
                                                [OutputSpec(2, sampling=GREEDY)])).result(5)
    assert result.outputs[0].token_id == 8  # the fake's next token: input + 1
    shared = remote.share_pages("a", pages[:1])
    assert len(shared) == 1 and remote.stats().num_free_pages == 30
    remote.free_pages("a", [pages[1], *shared])
    remote.close_instance("a")
    assert remote.stats().num_free_pages == 32


def test_errors_come_back_as_the_controllers(core: Core) -> None:
    remote = core.remote
    with pytest.raises(ControlError, match="unknown instance"):
        remote.free_pages("nobody", [0])
    remote.open_instance("a")
    with pytest.raises(ControlError, match="unknown page id"):
        remote.free_pages("a", [7])
    pages = remote.allocate_pages("a", 1).result(5)
    with pytest.raises(ControlError, match="token id -1"):
        remote.forward("a", VirtualForward([-1], [0], pages, 1)).result(5)
    with pytest.raises(ControlError, match="already open"):
        remote.open_instance("a")
    remote.close_instance("a")


def test_decode_streams_every_token_then_the_end(core: Core) -> None:
    remote = core.remote
    remote.open_instance("a")
    pages = remote.allocate_pages("a", 4).result(5)
    stream = remote.decode("a", DecodeRequest([10, 11], 0, pages, 0, GREEDY, max_new_tokens=5))
    assert stream.done.result(5) == "length"
    assert [o.token_id for o in stream.drain()] == [12, 13, 14, 15, 16]
    stopped = remote.decode("a", DecodeRequest([20], 0, pages, 0, GREEDY, max_new_tokens=9,
                                               stop_token_ids=frozenset({23})))
    assert stopped.done.result(5) == "stop" and [o.token_id for o in stopped.drain()] == [21, 22, 23]
    remote.close_instance("a")


def test_tokens_without_logprobs_travel_as_arrays_and_logprobs_as_asked(core: Core) -> None:
    """A decode that asks for no logprobs gets bare tokens (the core's Tokens arrays; the fake executor's
    logprob is not sent); one that asks gets them, token by token."""
    remote = core.remote
    remote.open_instance("a")
    pages = remote.allocate_pages("a", 8).result(5)
    plain = remote.decode("a", DecodeRequest([10], 0, pages[:4], 0, GREEDY, max_new_tokens=6))
    asked = remote.decode("a", DecodeRequest([30], 0, pages[4:], 0, SamplingParams(num_logprobs=0),
                                             max_new_tokens=3))
    assert plain.done.result(5) == "length" and asked.done.result(5) == "length"
    assert [(o.token_id, o.logprob) for o in plain.drain()] == [(t, None) for t in range(11, 17)]
    assert [(o.token_id, o.logprob) for o in asked.drain()] == [(31, 0.0), (32, 0.0), (33, 0.0)]
    remote.close_instance("a")


def test_a_flush_sends_tokens_before_the_events_taken_with_them(tmp_path: Path) -> None:
    """FrontLink: plain tokens are taken after the events and put first, so a decode's End never overtakes its
    tokens; a closed link takes no more."""
    import zmq

    from pie_server.engine.core.messages import EVENTS_DECODER, End, Reply, Tokens
    from pie_server.engine.core.server import FrontLink

    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    address = f"ipc://{tmp_path}/front"
    inbox.bind(address)
    link = FrontLink(context, os.getpid(), address)
    try:
        link.emit_token(7, 100)
        link.emit(Reply(3, [1, 2]))
        link.emit_token(8, 200)
        link.emit_token(7, 101)
        link.emit(End(7, "length"))
        link.flush()
        assert inbox.poll(5000)
        assert EVENTS_DECODER.decode(inbox.recv()) == [Tokens([7, 100, 8, 200, 7, 101]), Reply(3, [1, 2]),
                                                        End(7, "length")]
        link.emit_token(8, 201)
        link.flush()
        assert inbox.poll(5000) and EVENTS_DECODER.decode(inbox.recv()) == [Tokens([8, 201])]
        link.flush()  # nothing left: nothing sent
        link.close()
        link.emit_token(8, 202)
        link.flush()
        assert not inbox.poll(100)
    finally:
        inbox.close()
        context.term()


def test_a_decode_under_a_grammar_crosses_the_wire(tmp_path: Path) -> None:
    made = Core(tmp_path, FakeExecutor(num_pages=32, page_size=4, vocab_size=VOCAB_SIZE), GRAMMARS)
    remote = made.remote
    assert remote.can_decode_grammar
    remote.open_instance("a")
    pages = remote.allocate_pages("a", 4).result(5)
    # Resumed after "ab" (accepted before): the fake would write "c" after "b" unmasked, the grammar wants "x".
    stream = remote.decode("a", DecodeRequest([ord("b")], 0, pages, 0, GREEDY, max_new_tokens=9,
                                              grammar=GrammarSpec("regex", "abx{3}", (ord("a"), ord("b")))))
    assert stream.done.result(5) == "stop" and bytes(o.token_id for o in stream.drain()) == b"xxx"
    bad = remote.decode("a", DecodeRequest([1], 0, pages, 0, GREEDY, max_new_tokens=2,
                                           grammar=GrammarSpec("json-schema", "[")))
    with pytest.raises(ControlError, match="not valid JSON"):
        bad.done.result(5)
    remote.close_instance("a")
    made.close()
    assert made.controller.stats().num_free_pages == 32


def test_a_decode_with_a_bad_page_ends_with_its_error(core: Core) -> None:
    remote = core.remote
    remote.open_instance("a")
    stream = remote.decode("a", DecodeRequest([1], 0, [3], 0, GREEDY, max_new_tokens=2))
    with pytest.raises(ControlError, match="unknown page id"):
        stream.done.result(5)
    remote.close_instance("a")


def test_stop_decode_ends_a_long_decode(tmp_path: Path) -> None:
    made = Core(tmp_path, FakeExecutor(num_pages=32, page_size=4, step_delay_s=0.005))
    try:
        remote = made.remote
        remote.open_instance("a")
        pages = remote.allocate_pages("a", 16).result(5)
        stream = remote.decode("a", DecodeRequest([1], 0, pages, 0, GREEDY, max_new_tokens=60))
        while not stream.drain():
            time.sleep(0.001)
        remote.stop_decode("a", stream)
        assert stream.done.result(5) == "cancelled"
        remote.close_instance("a")
    finally:
        made.close()


def test_a_running_decode_is_given_more_room_over_the_wire(tmp_path: Path) -> None:
    """extend_decode is posted after the allocation it names (served in order): the decode goes on past the
    room it started with, to its max_new_tokens."""
    made = Core(tmp_path, FakeExecutor(num_pages=32, page_size=4, step_delay_s=0.02))
    try:
        remote = made.remote
        remote.open_instance("a")
        pages = remote.allocate_pages("a", 2).result(5)  # 8 slots: the prompt token and 7 more
        stream = remote.decode("a", DecodeRequest([1], 0, pages, 0, GREEDY, max_new_tokens=12))
        remote.extend_decode("a", stream, remote.allocate_pages("a", 2).result(5), 2)
        assert stream.done.result(5) == "length" and [o.token_id for o in stream.drain()] == list(range(2, 14))
        remote.close_instance("a")
    finally:
        made.close()


def test_try_allocate_takes_only_free_pages(core: Core) -> None:
    remote = core.remote
    remote.open_instance("a")
    assert remote.try_allocate_pages("a", 30) == list(range(30))
    assert remote.try_allocate_pages("a", 3) == []  # 2 are free: none, and nothing waits for them
    assert call_later(remote, "try_allocate_pages", "a", 2).result(5) == [30, 31]
    assert remote.stats().num_free_pages == 0
    remote.close_instance("a")


def test_admission_grants_in_order_and_takes_back_cancelled_waits(core: Core) -> None:
    admission = core.remote.admission
    total = admission.num_pages
    first = admission.reserve(total)
    first.result(5)
    waiting = admission.reserve(1)
    time.sleep(0.05)
    assert not waiting.done()
    assert waiting.cancel()
    admission.release(total)
    again = admission.reserve(total)
    again.result(5)  # the cancelled wait holds nothing
    admission.release(total)
    deadline = time.monotonic() + 5
    while core.controller.admission.num_free != total and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.controller.admission.num_free == total


def test_the_cores_end_fails_waiting_calls_and_streams(tmp_path: Path) -> None:
    made = Core(tmp_path, FakeExecutor(num_pages=32, page_size=4))
    remote = made.remote
    remote.open_instance("a")
    pages = remote.allocate_pages("a", 1).result(5)
    made.core.stop()
    made.thread.join()
    remote.core_pid = _dead_pid()  # the core "process" is gone
    pending = remote.allocate_pages("a", 1)
    with pytest.raises(ControlError, match="has stopped"):
        pending.result(5)
    assert not remote.is_alive
    with pytest.raises(ControlError, match="has stopped"):
        remote.decode("a", DecodeRequest([1], 0, pages, 0, GREEDY, max_new_tokens=2))
    remote.close()
    made.core.close()
    made.controller.close_instance("a")
    made.controller.stop()


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


FRONT_END_THAT_DIES = """
import os, sys
from pie_server.engine.core.client import RemoteControl
remote = RemoteControl(sys.argv[1], int(sys.argv[2]), sys.argv[3], connect_timeout_s=10)
remote.open_instance("gone")
remote.allocate_pages("gone", 5).result(5)
remote.admission.reserve(7).result(5)
print("holding", flush=True)
os._exit(0)
"""


def test_a_front_end_that_dies_leaves_nothing_held(core: Core, tmp_path: Path) -> None:
    import subprocess
    import sys

    address = core_address_of(str(tmp_path))
    out = subprocess.run([sys.executable, "-c", FRONT_END_THAT_DIES, address, str(os.getpid()), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert "holding" in out.stdout, out.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = core.controller.stats()
        if stats.num_instances == 0 and core.controller.admission.num_free == core.controller.admission.num_pages:
            break
        time.sleep(0.05)
    assert stats.num_instances == 0 and stats.num_free_pages == stats.num_pages
    assert core.controller.admission.num_free == core.controller.admission.num_pages


def test_call_later_answers_through_a_future_in_call_order(core: Core) -> None:
    """The runtime's scheduler thread sends value calls without waiting (engine/control/api.py call_later):
    each Future settles with the reply or the error, and a later call sees what an earlier one did."""
    remote = core.remote
    opened = call_later(remote, "open_instance", "a", None)
    pages = remote.allocate_pages("a", 2).result(5)  # sent after the open: served after it
    assert opened.result(5) is None and pages == [0, 1]
    shared = call_later(remote, "share_pages", "a", pages[:1])
    freed = call_later(remote, "free_pages", "a", [7])
    stats = call_later(remote, "stats")
    assert len(shared.result(5)) == 1 and stats.result(5).num_free_pages == 30
    with pytest.raises(ControlError, match="unknown page id"):
        freed.result(5)
    with pytest.raises(ValueError, match="not a call that answers at once"):
        call_later(remote, "forward", "a")
    assert call_later(core.controller, "list_exports").result(0) == []  # in process: run at once
    call_later(remote, "close_instance", "a").result(5)
    assert remote.stats().num_free_pages == 32

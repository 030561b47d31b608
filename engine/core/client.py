"""The front end's side of the wire: RemoteControl is engine/control/api.py's Control over an engine core in
another process, so the Wasm runtime and the app run on it unchanged.

Calls that return a value wait for the reply (one round trip); calls that return a Future or a DecodeStream
return at once and are settled by the receiving thread when the core answers. A decode's tokens arrive in
one message per engine step for all of this front end's decodes. When the core process ends, every waiting
call, Future and stream fails with ControlError and `is_alive` turns False (the app's /health answers 503).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec
import zmq

from pie_server.engine.config import EngineInfo
from pie_server.engine.control.api import ControlError, ControlStats, InstanceClosed, VirtualForward
from pie_server.engine.control.decoding import DecodeRequest, DecodeStream
from pie_server.engine.processes import is_alive as _is_alive
from pie_server.engine.futures import settle
from pie_server.engine.core.messages import (ENCODER, EVENTS_DECODER, PLAIN_METHODS, PLAIN_VALUES, Call, CoreFacts,
                                             End, Output, Reply, Tokens)
from pie_server.engine.step import CommandResult, OutputResult
from pie_server.engine.types import InstanceId, TokenId, VirtualPageId

log = logging.getLogger(__name__)

POLL_MS = 200  # how often the receiver checks that the core process is still there
ERRORS: dict[str, type[Exception]] = {"ControlError": ControlError, "InstanceClosed": InstanceClosed,
                                      "ValueError": ValueError, "TypeError": TypeError}


class CoreGone(ControlError):
    """The engine core process has ended."""


class RemoteControl:
    def __init__(self, address: str, core_pid: int, run_dir: str | Path, connect_timeout_s: float = 600.0) -> None:
        self.core_pid = core_pid
        self._context = zmq.Context()
        self._out = self._context.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(address)
        self._send_lock = threading.Lock()
        self._in = self._context.socket(zmq.PULL)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in_address = f"ipc://{Path(run_dir) / f'front-{os.getpid()}'}"
        self._in.bind(self._in_address)
        self._ids = itertools.count(1)
        # call id -> (waiter, value type, what to run if a success finds the waiter cancelled)
        self._pending: dict[int, tuple[Future[Any] | DecodeStream, Any, Callable[[], None] | None]] = {}
        self._decode_calls: dict[int, int] = {}  # id(stream) -> its decode's call id
        self._gone: str | None = None
        self._closing = False
        self._receiver = threading.Thread(target=self._receive, name="core-receiver", daemon=True)
        self._receiver.start()
        hello = self._start_call("hello", [os.getpid(), self._in_address], CoreFacts)
        try:
            self.facts: CoreFacts = _wait(hello, connect_timeout_s, "the engine core did not answer")
        except BaseException:
            self.close()  # its socket's address is this process's: a later connection binds it again
            raise
        self.info: EngineInfo = self.facts.info
        self.admission = RemoteAdmission(self, self.facts.admission_pages)
        self.can_decode_grammar = self.facts.can_decode_grammar

    @property
    def is_alive(self) -> bool:
        return self._gone is None and not self._closing

    def close(self) -> None:
        self._closing = True
        self._receiver.join(timeout=2 * POLL_MS / 1000)
        with self._send_lock:
            self._out.close()
        self._in.close()
        self._context.term()

    # -- Control ---------------------------------------------------------------------------------------------
    def open_instance(self, instance_id: InstanceId, max_pages: int | None = None) -> None:
        self._call("open_instance", [instance_id, max_pages])

    def close_instance(self, instance_id: InstanceId) -> None:
        self._call("close_instance", [instance_id])

    def allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Future[list[VirtualPageId]]:
        return self._start_call("allocate_pages", [instance_id, num_pages], list[int])

    def try_allocate_pages(self, instance_id: InstanceId, num_pages: int) -> list[VirtualPageId]:
        return self._call("try_allocate_pages", [instance_id, num_pages], list[int])

    def free_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> None:
        self._call("free_pages", [instance_id, list(page_ids)])

    def copy_slots(self, instance_id: InstanceId, src_page_id: VirtualPageId, dst_page_id: VirtualPageId,
                   src_offset: int, dst_offset: int, num_slots: int) -> None:
        self._call("copy_slots", [instance_id, src_page_id, dst_page_id, src_offset, dst_offset, num_slots])

    def mask_slots(self, instance_id: InstanceId, page_id: VirtualPageId, slot_mask: Sequence[bool]) -> None:
        self._call("mask_slots", [instance_id, page_id, list(slot_mask)])

    def share_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> list[VirtualPageId]:
        return self._call("share_pages", [instance_id, list(page_ids)], list[int])

    def export_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId], name: str) -> None:
        self._call("export_pages", [instance_id, list(page_ids), name])

    def import_pages(self, instance_id: InstanceId, name: str) -> list[VirtualPageId]:
        return self._call("import_pages", [instance_id, name], list[int])

    def unexport_pages(self, name: str) -> None:
        self._call("unexport_pages", [name])

    def list_exports(self) -> list[str]:
        return self._call("list_exports", [], list[str])

    def prefix_lookup(self, instance_id: InstanceId, token_ids: Sequence[TokenId]) -> tuple[list[VirtualPageId], int]:
        return self._call("prefix_lookup", [instance_id, list(token_ids)], tuple[list[int], int])

    def prefix_publish(self, instance_id: InstanceId, token_ids: Sequence[TokenId],
                       page_ids: Sequence[VirtualPageId]) -> None:
        self._call("prefix_publish", [instance_id, list(token_ids), list(page_ids)])

    def clear_prefix_cache(self) -> None:
        self._call("clear_prefix_cache", [])

    def forward(self, instance_id: InstanceId, command: VirtualForward) -> Future[CommandResult]:
        if not isinstance(command, VirtualForward):
            raise ControlError(f"forward takes a VirtualForward, got {type(command).__name__}")
        return self._start_call("forward", [instance_id, command], CommandResult)

    def decode(self, instance_id: InstanceId, request: DecodeRequest) -> DecodeStream:
        """Returns at once: an invalid first forward ends the stream with its error instead of raising."""
        stream = DecodeStream()
        call_id = next(self._ids)
        self._decode_calls[id(stream)] = call_id
        self._pending[call_id] = (stream, None, None)
        self._send(Call(os.getpid(), call_id, "decode", [instance_id, request]))
        return stream

    def extend_decode(self, instance_id: InstanceId, stream: DecodeStream, page_ids: Sequence[VirtualPageId],
                      num_pages_before: int) -> None:
        """Posted: the core serves a front end's calls in order, so the allocation of page_ids came first."""
        call_id = self._decode_calls.get(id(stream))
        if call_id is not None:
            self._post("extend_decode", [instance_id, call_id, list(page_ids), num_pages_before])

    def stop_decode(self, instance_id: InstanceId, stream: DecodeStream) -> None:
        stream.stop_requested = True
        call_id = self._decode_calls.get(id(stream))
        if call_id is not None:
            self._post("stop_decode", [instance_id, call_id])

    def stats(self) -> ControlStats:
        return self._call("stats", [], ControlStats)

    def call_later(self, method: str, *args: Any) -> Future[Any]:
        """One of the calls above that answer a value, sent without waiting: the Future settles with the
        reply (engine/control/api.py call_later). Calls are served in the order they were sent, so a later
        call sees its effect."""
        if method not in PLAIN_METHODS:
            raise ValueError(f"{method!r} is not a call that answers at once")
        return self._start_call(method, list(args), PLAIN_VALUES.get(method, Any))

    # -- calls -----------------------------------------------------------------------------------------------
    def _call(self, method: str, args: list[Any], value_type: Any = Any) -> Any:
        if threading.current_thread() is self._receiver:
            raise RuntimeError(f"{method}: a Future's callback must not wait for the engine core")
        return _wait(self._start_call(method, args, value_type), None, "")

    def _start_call(self, method: str, args: list[Any], value_type: Any,
                    orphaned: Callable[[], None] | None = None) -> Future[Any]:
        """Sends the call; the Future settles with its reply. orphaned() runs if a successful reply finds the
        Future already cancelled (what it got must then be given back)."""
        return self._start(method, args, value_type, orphaned)[1]

    def _start(self, method: str, args: list[Any], value_type: Any,
               orphaned: Callable[[], None] | None = None) -> tuple[int, Future[Any]]:
        future: Future[Any] = Future()
        call_id = next(self._ids)
        self._pending[call_id] = (future, value_type, orphaned)
        self._send(Call(os.getpid(), call_id, method, args))
        return call_id, future

    def _post(self, method: str, args: list[Any]) -> None:
        """A call whose reply nobody waits for (call id 0: the core answers nothing, errors are logged there)."""
        self._send(Call(os.getpid(), 0, method, args))

    def _send(self, call: Call) -> None:
        if self._gone is not None:
            self._pending.pop(call.call_id, None)
            raise CoreGone(self._gone)
        data = ENCODER.encode(call)
        with self._send_lock:
            self._out.send(data)

    # -- the receiving thread --------------------------------------------------------------------------------
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._in, zmq.POLLIN)
        while not self._closing:
            if not poller.poll(POLL_MS):
                if not _is_alive(self.core_pid):
                    self._fail_all(f"the engine core (process {self.core_pid}) has stopped")
                    return
                continue
            for event in EVENTS_DECODER.decode(self._in.recv()):
                try:
                    self._settle(event)
                except Exception:  # a bug here must not stop every other call's replies
                    log.exception("could not deliver a reply from the engine core")

    def _settle(self, event: Reply | Output | Tokens | End) -> None:
        if isinstance(event, Tokens):
            self._push_tokens(event.pairs)
            return
        if isinstance(event, Output):
            stream = self._pending[event.call_id][0]
            assert isinstance(stream, DecodeStream)
            _push(stream, OutputResult(event.token_id, event.logprob, event.top_logprobs))
            return
        entry = self._pending.pop(event.call_id, None)
        if entry is None:
            return
        waiter, value_type, orphaned = entry
        if isinstance(event, End):
            assert isinstance(waiter, DecodeStream)
            self._decode_calls.pop(id(waiter), None)
            settle(waiter.done, event.reason, _error(event.error))
        elif isinstance(waiter, Future):
            error = _error(event.error)
            value = None if error is not None or value_type is Any else msgspec.convert(event.value, value_type)
            if not settle(waiter, value, error) and error is None and orphaned is not None:
                orphaned()

    def _push_tokens(self, pairs: list[int]) -> None:
        pending = self._pending
        for k in range(0, len(pairs), 2):
            entry = pending.get(pairs[k])
            if entry is not None:  # else failed here meanwhile (_fail_all): nobody reads its tokens
                _push(entry[0], OutputResult(pairs[k + 1]))  # type: ignore[arg-type]

    def _fail_all(self, reason: str) -> None:
        self._gone = reason
        log.error("%s: failing %d waiting calls", reason, len(self._pending))
        for call_id in list(self._pending):
            waiter = self._pending.pop(call_id)[0]
            future = waiter.done if isinstance(waiter, DecodeStream) else waiter
            settle(future, None, CoreGone(reason))


class RemoteAdmission:
    """engine/control/admission.py's Admission, kept by the engine core for every front end."""

    def __init__(self, control: RemoteControl, num_pages: int) -> None:
        self._control, self.num_pages = control, num_pages

    def reserve(self, num_pages: int) -> Future[None]:
        """As Admission.reserve: cancel the Future to stop waiting; if cancel() returns False the pages were
        granted and must be released. A grant that crosses the cancel on the wire is given back here."""
        if not 0 <= num_pages <= self.num_pages:
            raise ValueError(f"cannot reserve {num_pages} of {self.num_pages} pages")
        control = self._control
        call_id, future = control._start("reserve", [num_pages], None, lambda: self.release(num_pages))
        future.add_done_callback(lambda done: done.cancelled() and control._post("cancel_reserve", [call_id]))
        return future

    def release(self, num_pages: int) -> None:
        self._control._post("release", [num_pages])


def _push(stream: DecodeStream, output: OutputResult) -> None:
    """A decode's output into its stream, waking the reader that waits for it."""
    waiter = stream.push(output)
    if waiter is not None:
        settle(waiter, None, None)


def _wait(future: Future[Any], timeout_s: float | None, what: str) -> Any:
    try:
        return future.result(timeout_s)
    except TimeoutError:
        raise CoreGone(f"{what} within {timeout_s:.0f} s") from None


def _error(error: list[str] | None) -> BaseException | None:
    if error is None:
        return None
    name, message = error
    return ERRORS.get(name, ControlError)(message if name in ERRORS else f"{name}: {message}")

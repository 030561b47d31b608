"""The engine core's side of the wire: serves one Controller (and its Admission) to front-end processes.

Threads: the serving loop (this module; receives calls, runs them on the Controller, sends replies) and the
Controller's own stepping thread. Both emit events into per-front-end buffers; a buffer is sent as one
message after each engine step and after each batch of received calls, so a front end gets at most one
message per step for all its decodes.

A front end that goes away (its process ended) has its instances closed and its page reservations returned,
so it leaks nothing; the core itself ends when the process that started it is gone.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import msgspec
import zmq

from pie_server.engine.control.api import ControlError
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import DecodeRequest, DecodeStream
from pie_server.engine.processes import is_alive as _is_alive
from pie_server.engine.core.messages import (CALL_DECODER, ENCODER, FUTURE_METHODS, PLAIN_METHODS, Call, CoreFacts,
                                             End, Event, Output, Reply, Tokens, error_of)
from pie_server.engine.step import OutputResult

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0  # how often the core looks for front ends (and its parent) that went away
SEND_HWM = 1 << 20  # messages queued per front end before sends are dropped (it is then stuck or gone)

class FrontLink:
    """One front end as the core sees it: where its events go, and what it holds (to release if it goes)."""

    def __init__(self, context: zmq.Context, pid: int, address: str) -> None:
        self.pid = pid
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._lock = threading.Lock()
        self._events: list[Event] = []
        # Plain tokens as flat (call_id, token_id) pairs, appended without the lock (emit_token) and taken by
        # flush as a prefix: list.extend and the slice and del of a prefix are each one step under the GIL.
        self._token_pairs: list[int] = []
        self.closed = False
        self.instance_ids: set[str] = set()
        self.streams: dict[int, RelayStream] = {}  # running decodes by their call id
        self.reservations: dict[int, Future[None]] = {}  # waiting admission reservations by call id
        self.num_reserved_pages = 0

    def emit(self, event: Event) -> None:
        with self._lock:
            if not self.closed:  # a gone front end's late replies are dropped
                self._events.append(event)

    def emit_token(self, call_id: int, token_id: int) -> None:
        """A decode's plain token: the hot path of delivery (one per running decode per step), so no lock and no
        event object; flush sends a step's tokens as one Tokens array."""
        if not self.closed:  # a gone front end's tokens are dropped
            self._token_pairs.extend((call_id, token_id))

    def flush(self) -> None:
        with self._lock:
            if self.closed or not (self._events or self._token_pairs):
                return
            # Events first, then tokens: an End taken now was emitted after its decode's last token, which is
            # then in the tokens taken after it; the message puts the tokens first.
            events, self._events = self._events, []
            pairs = self._token_pairs
            num_taken = len(pairs)
            if num_taken:
                events.insert(0, Tokens(pairs[:num_taken]))
                del pairs[:num_taken]
            try:
                self._socket.send(ENCODER.encode(events), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("front end %d does not take messages; %d events dropped", self.pid, len(events))

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._events = []
            self._token_pairs.clear()
            self._socket.close()


class RelayStream(DecodeStream):
    """The core's end of a decode: its outputs and its end become events for the front end that asked."""

    def __init__(self, link: FrontLink, call_id: int, plain: bool = False) -> None:
        """plain: the decode asked for no logprobs, so its outputs are bare tokens (sent in Tokens arrays)."""
        super().__init__()
        self.link, self.call_id, self.plain = link, call_id, plain
        self.done.add_done_callback(self._ended)

    def push(self, output: OutputResult) -> None:
        if self.plain:
            self.link.emit_token(self.call_id, output.token_id or 0)
        else:
            self.link.emit(Output(self.call_id, output.token_id or 0, output.logprob, output.top_logprobs))
        return None

    def _ended(self, done: Future[str]) -> None:
        self.link.streams.pop(self.call_id, None)
        error = done.exception()
        self.link.emit(End(self.call_id, None if error is not None else done.result(),
                           None if error is None else error_of(error)))


class EngineCore:
    def __init__(self, control: Controller, facts: CoreFacts, address: str) -> None:
        self.control, self.facts = control, facts
        self._context = zmq.Context()
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(address)
        self._fronts: dict[int, FrontLink] = {}
        self._fronts_lock = threading.Lock()
        self._parent_pid = os.getppid()
        self._stopping = False
        self._special: dict[str, Callable[[FrontLink, Call], None]] = {
            "decode": self._decode, "extend_decode": self._extend_decode, "stop_decode": self._stop_decode,
            "reserve": self._reserve,
            "cancel_reserve": self._cancel_reserve, "release": self._release}
        control.add_step_listener(self.flush)
        # Starts decodes under a grammar off the serving loop, in arrival order (a stop_decode that comes first
        # finds the stream registered and ends the decode after its first forward).
        self._grammar_starter = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    # -- the loop -------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        next_check = time.monotonic() + CHECK_INTERVAL_S
        while not self._stopping:
            if poller.poll(100):
                self._receive_all()
            self.flush()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_INTERVAL_S
                self._check_fronts()

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        self._grammar_starter.shutdown(wait=True)
        for link in list(self._fronts.values()):
            link.close()
        self._inbox.close()
        self._context.term()

    def flush(self) -> None:
        with self._fronts_lock:
            links = list(self._fronts.values())
        for link in links:
            link.flush()

    def _receive_all(self) -> None:
        while True:
            try:
                raw = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                call = CALL_DECODER.decode(raw)
            except msgspec.DecodeError:
                log.error("dropped a malformed message of %d bytes", len(raw))
                continue
            self._serve(call)

    # -- calls ----------------------------------------------------------------------------------------------
    def _serve(self, call: Call) -> None:
        if call.method == "hello":
            self._hello(call)
            return
        link = self._fronts.get(call.front_id)
        if link is None:
            log.warning("a call from unknown front end %d", call.front_id)
            return
        try:
            if call.method in PLAIN_METHODS:
                args = msgspec.convert(call.args, PLAIN_METHODS[call.method])
                value = getattr(self.control, call.method)(*args)
                self._track(link, call.method, args)
                self._answer(link, call, value)
            elif call.method in FUTURE_METHODS:
                args = msgspec.convert(call.args, FUTURE_METHODS[call.method])
                future = getattr(self.control, call.method)(*args)
                future.add_done_callback(lambda done, c=call.call_id: link.emit(_reply_of(c, done)))
            elif call.method in self._special:
                self._special[call.method](link, call)
            else:
                raise ControlError(f"unknown method {call.method!r}")
        except Exception as exc:  # the caller's error (ControlError, a validation error), answered to it
            self._answer(link, call, None, exc)

    @staticmethod
    def _answer(link: FrontLink, call: Call, value: Any, error: BaseException | None = None) -> None:
        if call.call_id:
            link.emit(Reply(call.call_id, value, None if error is None else error_of(error)))
        elif error is not None:  # a posted call: nobody waits for its answer
            log.warning("front end %d: %s failed: %r", link.pid, call.method, error)

    def _hello(self, call: Call) -> None:
        pid, address = msgspec.convert(call.args, tuple[int, str])
        link = FrontLink(self._context, pid, address)
        with self._fronts_lock:
            old = self._fronts.pop(pid, None)
            self._fronts[pid] = link
        if old is not None:
            self._drop(old)
        link.emit(Reply(call.call_id, self.facts))
        log.info("front end %d connected", pid)

    @staticmethod
    def _track(link: FrontLink, method: str, args: tuple[Any, ...]) -> None:
        if method == "open_instance":
            link.instance_ids.add(args[0])
        elif method == "close_instance":
            link.instance_ids.discard(args[0])

    def _decode(self, link: FrontLink, call: Call) -> None:
        instance_id, request = msgspec.convert(call.args, tuple[str, DecodeRequest])
        stream = RelayStream(link, call.call_id, plain=request.sampling.num_logprobs is None)
        link.streams[call.call_id] = stream
        if request.grammar is not None:  # compiling it may take a while (the first one loads the tokenizer)
            self._grammar_starter.submit(self._start_decode, link, call, instance_id, request, stream)
        else:
            self._start_decode(link, call, instance_id, request, stream)

    def _start_decode(self, link: FrontLink, call: Call, instance_id: str, request: DecodeRequest,
                      stream: RelayStream) -> None:
        try:
            self.control.decode(instance_id, request, stream)
        except Exception as exc:  # its first forward is invalid: the decode ends at once
            link.streams.pop(call.call_id, None)
            link.emit(End(call.call_id, None, error_of(exc)))
            link.flush()  # on the grammar thread, no step or received call may flush it soon

    def _extend_decode(self, link: FrontLink, call: Call) -> None:
        instance_id, decode_call_id, page_ids, num_pages_before = msgspec.convert(
            call.args, tuple[str, int, list[int], int])
        stream = link.streams.get(decode_call_id)
        if stream is None:  # it ended: the front end decodes again with those pages
            return
        if stream.room is None:  # under a grammar, still starting on that thread: extended there, after it
            self._grammar_starter.submit(self.control.extend_decode, instance_id, stream, page_ids, num_pages_before)
        else:
            self.control.extend_decode(instance_id, stream, page_ids, num_pages_before)

    def _stop_decode(self, link: FrontLink, call: Call) -> None:
        instance_id, decode_call_id = msgspec.convert(call.args, tuple[str, int])
        stream = link.streams.get(decode_call_id)
        if stream is not None:
            self.control.stop_decode(instance_id, stream)

    def _reserve(self, link: FrontLink, call: Call) -> None:
        (num_pages,) = msgspec.convert(call.args, tuple[int])
        future = self.control.admission.reserve(num_pages)
        link.reservations[call.call_id] = future
        future.add_done_callback(lambda done: self._granted(link, call.call_id, num_pages, done))

    def _granted(self, link: FrontLink, call_id: int, num_pages: int, done: Future[None]) -> None:
        link.reservations.pop(call_id, None)
        if done.cancelled():
            link.emit(Reply(call_id, None, ["ControlError", "the reservation was cancelled"]))
            return
        if link.closed:  # granted to a front end that has gone
            self.control.admission.release(num_pages)
            return
        link.num_reserved_pages += num_pages
        link.emit(Reply(call_id, None))

    def _cancel_reserve(self, link: FrontLink, call: Call) -> None:
        (reserve_call_id,) = msgspec.convert(call.args, tuple[int])
        future = link.reservations.get(reserve_call_id)
        if future is not None:
            future.cancel()  # False: granted meanwhile; the front end releases when the grant arrives

    def _release(self, link: FrontLink, call: Call) -> None:
        (num_pages,) = msgspec.convert(call.args, tuple[int])
        if not 0 <= num_pages <= link.num_reserved_pages:
            raise ControlError(f"release of {num_pages} pages; {link.num_reserved_pages} are reserved")
        link.num_reserved_pages -= num_pages
        self.control.admission.release(num_pages)

    # -- front ends that went away -------------------------------------------------------------------------
    def _check_fronts(self) -> None:
        if os.getppid() != self._parent_pid:
            log.warning("the process that started the engine core is gone; stopping")
            self._stopping = True
        for link in list(self._fronts.values()):
            if not _is_alive(link.pid):
                with self._fronts_lock:
                    self._fronts.pop(link.pid, None)
                self._drop(link)

    def _drop(self, link: FrontLink) -> None:
        """Closes what the front end held: its instances (pages freed, decodes ended), its reservations."""
        log.warning("front end %d went away: closing its %d instances", link.pid, len(link.instance_ids))
        link.close()
        for instance_id in list(link.instance_ids):
            try:
                self.control.close_instance(instance_id)  # type: ignore[arg-type]
            except ControlError:
                pass
        for future in list(link.reservations.values()):
            future.cancel()
        if link.num_reserved_pages:
            self.control.admission.release(link.num_reserved_pages)
            link.num_reserved_pages = 0


def _reply_of(call_id: int, done: Future[Any]) -> Reply:
    error = done.exception()
    return Reply(call_id, None, error_of(error)) if error is not None else Reply(call_id, done.result())

"""Decoding in the control layer: one `decode` call runs a sequence forward after forward, one sampled token per
step, with no round trip to its caller per token. When a step's result comes back, the next forward (the token
just sampled) is queued at once, while the tokens stream to the caller through a DecodeStream; the caller
(the runtime's host-side `generate`) detokenizes, matches stop strings and may stop the decoding.

Decoding ends at a stop token, after `max_new_tokens`, at the model's context limit (the same rule as the
runtime's), when the pages given have no slot left for the next token ("room": the caller allocates more and
decodes again; a caller that gives more pages while it runs, `extend_decode`, keeps it going), when the caller
stops it, or with an error (the instance closed or failed, the executor failed).
The stream's `done` Future gets the end (a reason string, or the error); it is settled only when no forward of
the decoding is queued or running, so the caller may free the pages once it has seen it.

A decode under a grammar (DecodeRequest.grammar: a JSON schema or regex, engine/grammar.py) keeps its matcher
here: each forward samples under the mask of the tokens the grammar allows next, each sampled token is accepted
into it, and a grammar that allows nothing more ends the decode (stop). A decode with penalties keeps its output
so far (sampling.output_token_ids at the start) and gives it to each forward. Either way the next forward needs
the token just sampled, so it is never queued ahead of that token (no speculation, scheduling.py).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from pie_server.engine.control.api import ControlError, VirtualForward
from pie_server.engine.futures import Signal, settle
from pie_server.engine.grammar import GrammarError, GrammarMatcher, GrammarSpec
from pie_server.engine.step import CommandResult, OutputResult, OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId, TokenId, VirtualPageId

END_STOP, END_LENGTH, END_ROOM, END_CANCELLED = "stop", "length", "room", "cancelled"


@dataclass(frozen=True)
class DecodeRequest:
    """A sequence's pending tokens over its pages (context first, then room for new tokens)."""

    token_ids: Sequence[TokenId]  # >= 1 pending tokens: their KV is written first; the last one's next is sampled
    position: int  # of token_ids[0]
    page_ids: Sequence[VirtualPageId]  # hold the context_len tokens of the context, then free slots
    context_len: int  # tokens whose KV is already in page_ids
    sampling: SamplingParams
    max_new_tokens: int  # >= 1
    stop_token_ids: frozenset[TokenId] = frozenset()
    grammar: GrammarSpec | None = None  # what the sampled tokens must follow (from its accepted tokens on)

    def __post_init__(self) -> None:
        if not self.token_ids or self.max_new_tokens < 1 or self.context_len < 0:
            raise ValueError("a decode needs >= 1 pending token, max_new_tokens >= 1 and context_len >= 0")


class DecodeStream:
    """Sampled outputs in order, pushed by the control layer, drained by the caller. Thread-safe."""

    def __init__(self) -> None:
        # The end reason (END_*), or the error. A Signal (futures.py): its caller asks done() at every token.
        self.done: Future[str] = Signal()
        self._lock = threading.Lock()
        self._outputs: list[OutputResult] = []
        self._waiter: list[Future[None]] = []  # at most one; a box, so done's callback holds no reference to self
        self.stop_requested = False
        self.first_output_at: float | None = None  # time.monotonic() of the first push (request traces)
        # The running decode's pages (its Decoding's own list, set where the decode runs): extend_room grows it.
        self.room: list[VirtualPageId] | None = None
        # No reference cycle (a bound method here would make one): garbage collection stays rare.
        self.done.add_done_callback(functools.partial(_wake_at_end, self._lock, self._waiter))

    def push(self, output: OutputResult) -> Future[None] | None:
        """Adds an output; returns the waiter to settle (after the control layer's lock is released)."""
        with self._lock:
            self._outputs.append(output)
            waiter = self._waiter.pop() if self._waiter else None
        if self.first_output_at is None:
            self.first_output_at = time.monotonic()
        return waiter

    def drain(self) -> list[OutputResult]:
        with self._lock:
            outputs, self._outputs = self._outputs, []
        return outputs

    def install_waiter(self, waiter: Future[None]) -> bool:
        """Makes waiter the one to settle at the next output; False (installing nothing) if one is ready."""
        with self._lock:
            if self._outputs or self.done.done():
                return False
            self._waiter[:] = [waiter]
            return True


def extend_room(stream: DecodeStream, page_ids: Sequence[VirtualPageId], num_pages_before: int) -> None:
    """Appends pages (checked by the caller: the instance's, none listed twice) to the running decode's room, so
    it goes on past its old end instead of ending with END_ROOM. Only if the room holds num_pages_before pages
    (the caller's count): the caller's pages and the decode's stay the same list even if an extension was lost.
    Call it where the decode's steps are formed (under the control layer's lock): the room is read there.
    After the end it changes nothing that is read."""
    if stream.room is not None and not stream.done.done() and len(stream.room) == num_pages_before:
        stream.room.extend(page_ids)


def wait_any(streams: Sequence[DecodeStream]) -> Future[None] | None:
    """A Future settled at the next output or end of any of the streams; None when one has something already.
    A Signal: one is made per streaming request per token (futures.py)."""
    waiter: Future[None] = Signal()
    for stream in streams:
        if not stream.install_waiter(waiter):
            return None
    return waiter


def _wake_at_end(lock: threading.Lock, waiter_box: list[Future[None]], _: Future[str]) -> None:
    with lock:
        waiter = waiter_box.pop() if waiter_box else None
    if waiter is not None:
        settle(waiter)


@dataclass(eq=False, slots=True)
class Decoding:
    """The control layer's record of one decode (attached to each forward it queues)."""

    stream: DecodeStream
    max_new_tokens: int
    stop_token_ids: frozenset[TokenId]
    sampling: SamplingParams
    page_ids: list[VirtualPageId]  # the context's pages and the room after it
    num_generated: int = 0
    # Pipelined steps (scheduling.py): chunks of this decode in running steps, the next forwards queued ahead
    # of their tokens (each fed on the device from the one before it; at most ControlConfig.speculation_depth,
    # oldest first) while the forward before them runs, and the end found while that one ran.
    num_in_flight: int = 0
    speculated: list[Any] = field(default_factory=list)  # [ForwardItem] (work.py imports this module)
    end_reason: str | None = None
    table_version: int = -1  # the page table's version when this decode's last forward was fully validated
    grammar: GrammarMatcher | None = None  # at the state after the last accepted token
    failure: ControlError | None = None  # the grammar rejected a sampled token: the decode ends with this error
    output_token_ids: list[TokenId] | None = None  # with penalties: the output so far, in every forward's params
    next_mask: bytes | GrammarError | None = None  # the grammar's next mask, when computed with others' (fill_masks)

    @classmethod
    def of(cls, request: DecodeRequest, stream: DecodeStream, grammar: GrammarMatcher | None) -> "Decoding":
        """request's decode (grammar: request.grammar's matcher), streaming into stream."""
        sampling = request.sampling
        decoding = cls(stream, request.max_new_tokens, request.stop_token_ids, sampling, list(request.page_ids),
                       grammar=grammar,
                       output_token_ids=list(sampling.output_token_ids) if sampling.is_penalized else None)
        stream.room = decoding.page_ids  # the same list: extend_room grows what forward() and the limits read
        return decoding

    @property
    def follows_tokens(self) -> bool:
        """Whether each forward's parameters depend on the token sampled before (a grammar's mask, the output
        that penalties count): its next forward is never queued ahead of that token."""
        return self.grammar is not None or self.output_token_ids is not None

    def can_continue_after(self, position: int, context_len: int, page_size: int, max_context_len: int) -> bool:
        """Whether a decode whose newest forward, at position (over context_len slots), is running may go on after
        it, unless it samples a stop token: accept's test, made before the output is known (that forward's output
        is the decode's next token after those of the forwards before it still running: the one being delivered
        next and the speculated ones). Never when it follows tokens: the next forward's parameters depend on that
        output."""
        return not self.follows_tokens and not self.stream.stop_requested and self._limit_after(
            self.num_generated + len(self.speculated) + 1, position + 1, context_len, len(self.page_ids) * page_size,
            max_context_len) is None

    def forward(self, token_ids: list[TokenId], position: int, context_len: int, page_size: int) -> VirtualForward:
        """The forward writing token_ids after context_len tokens, over the pages their slots need."""
        num_slots = context_len + len(token_ids)
        num_pages = -(-num_slots // page_size)
        if num_pages > len(self.page_ids):
            raise ControlError(f"the decode's {len(self.page_ids)} pages hold {len(self.page_ids) * page_size} "
                               f"slots; its context and pending tokens need {num_slots}")
        return VirtualForward(token_ids=token_ids, positions=list(range(position, position + len(token_ids))),
                              page_ids=self.page_ids[:num_pages], last_page_len=num_slots - (num_pages - 1) * page_size,
                              outputs=[OutputSpec(index=len(token_ids) - 1, sampling=self.next_sampling())])

    def next_sampling(self) -> SamplingParams:
        """The next forward's sampling parameters: with the tokens so far (penalties) and the grammar's next mask
        (taken: call once per forward; ControlError if the grammar allows nothing)."""
        if self.output_token_ids is None:
            return self.sampling if self.grammar is None else self.sampling.with_allowed_mask(
                self._next_mask(self.grammar))
        changes: dict[str, Any] = {"output_token_ids": tuple(self.output_token_ids)}
        if self.grammar is not None:
            changes["allowed_token_mask"] = self._next_mask(self.grammar)
        return dataclasses.replace(self.sampling, **changes)

    def _next_mask(self, grammar: GrammarMatcher) -> bytes:
        """The mask computed with others' (next_mask, taken), else the matcher's own; ControlError if none."""
        mask, self.next_mask = self.next_mask, None
        try:
            if mask is None:
                return grammar.allowed_token_mask()
            if isinstance(mask, GrammarError):
                raise mask
        except GrammarError as error:
            raise ControlError(str(error)) from None
        return mask

    def accept(self, output: OutputResult, next_position: int, context_len: int, page_size: int,
               max_context_len: int) -> tuple[Future[None] | None, str | None]:
        """Takes a sampled output (its token now pending at next_position, after context_len tokens): streams
        it, and says which waiter to settle and why decoding ends (None: it goes on)."""
        self.num_generated += 1
        if self.output_token_ids is not None:
            self.output_token_ids.append(output.token_id)
        stream = self.stream
        waiter = stream.push(output)
        if stream.stop_requested:
            return waiter, END_CANCELLED
        if output.token_id in self.stop_token_ids:
            return waiter, END_STOP
        if self.grammar is not None:
            try:
                self.grammar.accept(output.token_id)
            except GrammarError as error:
                self.failure = ControlError(str(error))
                return waiter, END_STOP
            if self.grammar.stopped:  # nothing but the end may follow
                return waiter, END_STOP
        return waiter, self._limit_after(self.num_generated, next_position, context_len,
                                         len(self.page_ids) * page_size, max_context_len)

    def _limit_after(self, num_generated: int, next_position: int, context_len: int, num_slots: int,
                     max_context_len: int) -> str | None:
        """The end that the counts alone decide: max_new_tokens or the context limit (length), no slot left
        for the pending token (room)."""
        if num_generated >= self.max_new_tokens or next_position + 1 >= max_context_len:
            return END_LENGTH
        if context_len + 1 > num_slots:
            return END_ROOM
        return None


def decode_by_forwards(control: Any, instance_id: InstanceId, request: DecodeRequest,
                       grammar: GrammarMatcher | None = None) -> DecodeStream:
    """A decode through the Control's forward(), each result's callback submitting the next forward: for
    Controls without a decode of their own (test fakes). Same ends as the Controller's decode; grammar:
    request.grammar's matcher."""
    if request.grammar is not None and grammar is None:
        raise ControlError("this control cannot decode under a grammar (can_decode_grammar is False)")
    stream = DecodeStream()
    page_size, max_context_len = control.info.page_size, control.info.max_context_len
    decoding = Decoding.of(request, stream, grammar)

    def submit(token_ids: list[TokenId], position: int, context_len: int) -> None:
        future = control.forward(instance_id, decoding.forward(token_ids, position, context_len, page_size))
        future.add_done_callback(lambda done: on_result(done, position + len(token_ids), context_len + len(token_ids)))

    def on_result(done: Future[CommandResult], next_position: int, context_len: int) -> None:
        if done.exception() is not None:
            stream.done.set_exception(done.exception())  # type: ignore[arg-type]
            return
        output = done.result().outputs[0]
        waiter, end = decoding.accept(output, next_position, context_len, page_size, max_context_len)
        if waiter is not None:
            settle(waiter)
        if decoding.failure is not None:
            stream.done.set_exception(decoding.failure)
            return
        if end is not None:
            stream.done.set_result(end)
            return
        try:
            submit([output.token_id], next_position, context_len)
        except Exception as error:  # the instance closed meanwhile
            stream.done.set_exception(error)

    submit(list(request.token_ids), request.position, request.context_len)
    return stream

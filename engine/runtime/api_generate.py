"""Host functions of `generate`: the decode loop in the host.

Per step, every unfinished sequence of the call issues one forward (its pending tokens, one sampled output)
and the call waits for all of them, so `generate-all` sequences share batches. Pages grow on demand. A
sequence's state and layout: sequence.py; a running decode's next room: decode_room.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Any, Iterator

from pie_server.engine.control.api import KV_EVICTED, ControlError, VirtualForward
from pie_server.engine.control.decoding import END_STOP, DecodeRequest, DecodeStream, wait_any
from pie_server.engine.grammar import GrammarError, GrammarSpec
from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.runtime.api_forward import SAMPLING_PARAMS, as_sampling
from pie_server.engine.runtime.api_kv import check_token_ids
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import GuestError, HostFunction, expect
from pie_server.engine.runtime.instance import HostTaskGen, InstanceState
from pie_server.engine.runtime.messages import Event, Text
from pie_server.engine.runtime.stop_strings import StopMatcher
from pie_server.engine.runtime.tokenizer import StreamDecoder
from pie_server.engine.runtime.decode_room import TopUps, extend_decodes, start_top_up, take_top_up
from pie_server.engine.runtime.sequence import FINISH_EVICTED, Sequence, free_later

log = logging.getLogger(__name__)

TOKEN_LOGPROB = ("record", ("token-id", "u32"), ("logprob", "f32"))
POSITION_LOGPROBS = ("record", ("token-id", "u32"), ("logprob", "f32"), ("top-logprobs", ("list", TOKEN_LOGPROB)))
GENERATION = ("record", ("token-ids", ("list", "u32")), ("text", "string"), ("finish-reason", ("enum",)),
              ("logprobs", ("list", POSITION_LOGPROBS)), ("page-ids", ("list", "u32")), ("last-page-len", "u32"),
              ("pending-token-ids", ("list", "u32")), ("next-position", "u32"))
GENERATION_RESULT = ("result", GENERATION, "string")
GENERATE_REQUEST = ("record", ("page-ids", ("list", "u32")), ("last-page-len", "u32"),
                    ("input-token-ids", ("list", "u32")), ("position", "u32"), ("sampling", SAMPLING_PARAMS),
                    ("max-tokens", "u32"), ("stop-token-ids", ("list", "u32")), ("stop-strings", ("list", "string")),
                    ("ignore-eos", "bool"), ("constraint", ("option", ("variant", {
                        "allowed-tokens": ("list", "u32"), "json-schema": "string", "regex": "string"}))),
                    ("stream-channel", ("option", "u32")))
GENERATE_OPTIONS = ("record", ("skip-special-tokens", "bool"), ("spaces-between-special-tokens", "bool"),
                    ("stream-logprobs", "bool"))
# What generate and generate-all do (they predate the options): special tokens printed, text messages.
DEFAULT_OPTIONS = {"skip-special-tokens": False, "spaces-between-special-tokens": True, "stream-logprobs": False}
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


def _new_decoder(host: Host, options: dict[str, Any]) -> StreamDecoder:
    skip, spaces = options["skip-special-tokens"], options["spaces-between-special-tokens"]
    if not skip and spaces:
        return host.tokenizer.new_decoder()  # the default: any RuntimeTokenizer has it
    new_decoder: Any = host.tokenizer.new_decoder  # this form is optional in RuntimeTokenizer
    return new_decoder(skip_special_tokens=skip, spaces_between_special_tokens=spaces)  # type: ignore[no-any-return]


def _sequence(request: dict[str, Any], host: Host, options: dict[str, Any] = DEFAULT_OPTIONS) -> Sequence:
    model = host.model
    pages, last_page_len, tokens = request["page-ids"], request["last-page-len"], request["input-token-ids"]
    expect(len(tokens) > 0, "input-token-ids must hold at least one token (the last one is what is sampled after)")
    expect(request["max-tokens"] > 0, "max-tokens must be at least 1")
    expect((not pages and last_page_len == 0) or (pages and 0 < last_page_len <= model.page_size),
           f"last-page-len must be 0 without pages, else in [1, {model.page_size}]")
    check_token_ids(tokens, model.vocab_size)
    check_token_ids(request["stop-token-ids"], model.vocab_size)
    stop_strings = request["stop-strings"]
    expect(len(stop_strings) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
    expect(all(len(s) <= MAX_STOP_STRING_CHARS for s in stop_strings),
           f"a stop string has at most {MAX_STOP_STRING_CHARS} characters")
    params = as_sampling(request["sampling"], model.vocab_size)
    grammar_spec = None
    if request["constraint"] is not None and request["constraint"][0] != "allowed-tokens":
        grammar_spec = GrammarSpec(*request["constraint"])
        with _grammar_errors():  # compiled (or found compiled) here: a bad grammar fails the call at once
            host.grammars.get().check(grammar_spec)  # type: ignore[union-attr]
    elif request["constraint"] is not None:
        _, allowed = request["constraint"]
        expect(len(allowed) > 0, "allowed-tokens must not be empty")
        check_token_ids(allowed, model.vocab_size)
        expect(params.allowed_token_ids is None, "give allowed tokens in sampling or in constraint, not both")
        params = dataclasses.replace(params, allowed_token_ids=tuple(allowed))
    if not params.prompt_token_ids:
        params = dataclasses.replace(params, prompt_token_ids=tuple(tokens))
    stops = set(request["stop-token-ids"]) | (set() if request["ignore-eos"] else set(model.eos_token_ids))
    context_len = (len(pages) - 1) * model.page_size + last_page_len if pages else 0
    expect(context_len + len(tokens) < model.max_context_len, f"the prompt fills the model's context "
           f"({model.max_context_len} tokens)")
    return Sequence(pages=list(pages), context_len=context_len, pending=list(tokens),
                    position=request["position"], params=params, max_tokens=request["max-tokens"],
                    stop_token_ids=frozenset(stops), stop=StopMatcher(stop_strings),
                    decoder=_new_decoder(host, options),
                    stream_channel=request["stream-channel"], page_size=model.page_size,
                    stream_logprobs=options["stream-logprobs"] and params.num_logprobs is not None,
                    penalized=params.is_penalized, grammar_spec=grammar_spec)


@contextlib.contextmanager
def _grammar_errors() -> Iterator[None]:
    """A grammar that does not compile is the guest's error."""
    try:
        yield
    except GrammarError as error:
        raise GuestError(str(error)) from None


def _last_page_len(num_tokens: int, num_pages: int, page_size: int) -> int:
    return num_tokens - (num_pages - 1) * page_size if num_pages else 0


def _command(seq: Sequence, page_size: int) -> VirtualForward:
    params = seq.params
    if seq.penalized:
        params = dataclasses.replace(params, output_token_ids=tuple(seq.generated))
    if seq.grammar is not None:  # raises GrammarError
        params = dataclasses.replace(params, allowed_token_mask=seq.grammar.allowed_token_mask())
    return VirtualForward(token_ids=list(seq.pending),
                          positions=list(range(seq.position, seq.position + len(seq.pending))),
                          page_ids=list(seq.pages),
                          last_page_len=_last_page_len(seq.context_len + len(seq.pending), len(seq.pages), page_size),
                          outputs=[OutputSpec(index=len(seq.pending) - 1, sampling=params)])


def _emit(seq: Sequence, inst: InstanceState, text: str, last: bool = False) -> None:
    """Stream a delta; with stream_logprobs it carries the logprobs not sent yet (the last one: even without
    text, so every token's logprobs are streamed once)."""
    if seq.stream_channel is None:
        return
    if not seq.stream_logprobs:
        if text:
            inst.outbox.put(Text(text, seq.stream_channel))
        return
    pending = seq.logprobs[seq.num_sent_logprobs:]
    if text or (last and pending):
        seq.num_sent_logprobs = len(seq.logprobs)
        logprobs = [[p["token-id"], p["logprob"], [[t["token-id"], t["logprob"]] for t in p["top-logprobs"]]]
                    for p in pending]
        inst.outbox.put(Event(json.dumps({"type": "delta", "channel": seq.stream_channel, "text": text,
                                          "logprobs": logprobs})))


def _fail(seq: Sequence, inst: InstanceState, what: str, error: object) -> None:
    """A sequence's allocation or forward failed. When the last resort of preemption dropped its KV, the
    generation ends with what it decoded so far (finish reason "evicted", its text streamed out) and no pages,
    so the caller can compute the context again and go on; any other failure is the sequence's error."""
    if str(error).startswith(KV_EVICTED):
        seq.finish_reason = FINISH_EVICTED
        _end_stream(seq, inst)
    else:
        seq.error = f"{what} failed: {error}"


def _accept(seq: Sequence, inst: InstanceState, token_id: int, output: Any, max_context_len: int) -> None:
    """Take one sampled token: stop conditions, detokenization, streaming."""
    seq.position += len(seq.pending)
    seq.context_len += len(seq.pending)
    seq.pending = [token_id]
    seq.generated.append(token_id)
    if seq.params.num_logprobs is not None:
        seq.logprobs.append({"token-id": token_id, "logprob": output.logprob if output.logprob is not None else 0.0,
                             "top-logprobs": [{"token-id": t, "logprob": lp} for t, lp in output.top_logprobs]})
    if token_id in seq.stop_token_ids:
        seq.finish_reason = "stop"
    else:
        _emit(seq, inst, seq.stop.add(seq.decoder.add([token_id])))
        if seq.stop.stopped:
            seq.finish_reason = "stop"
        elif seq.grammar is not None:
            try:
                seq.grammar.accept(token_id)
            except GrammarError as error:
                seq.error = str(error)
                return
            if seq.grammar.stopped:  # the grammar allows nothing more
                seq.finish_reason = "stop"
    if seq.finish_reason is None and (len(seq.generated) >= seq.max_tokens or seq.position + 1 >= max_context_len):
        seq.finish_reason = "length"
    if seq.finish_reason is not None:
        _end_stream(seq, inst)


def _end_stream(seq: Sequence, inst: InstanceState) -> None:
    """The sequence finished: what the decoder and the stop matcher still hold (unless a stop string ended
    it), then the last delta."""
    if not seq.stop.stopped:
        _emit(seq, inst, seq.stop.add(seq.decoder.flush()))
        _emit(seq, inst, seq.stop.finish())
    _emit(seq, inst, "", last=True)


def _result(seq: Sequence) -> tuple[str, Any]:
    if seq.error is not None:
        return ("err", seq.error)
    return ("ok", {"token-ids": seq.generated, "text": seq.stop.text, "finish-reason": seq.finish_reason,
                   "logprobs": seq.logprobs, "page-ids": seq.pages,
                   "last-page-len": _last_page_len(seq.context_len, len(seq.pages), seq.page_size),
                   "pending-token-ids": seq.pending, "next-position": seq.position})


def run_sequences(host: Host, inst: InstanceState, seqs: list[Sequence]) -> HostTaskGen:
    """Decodes the sequences to their ends. They decode in the control layer (one call per page of tokens; a
    grammar and penalties run there too), unless a grammar the control cannot run needs the host between tokens:
    then forward by forward."""
    in_control = all(s.grammar_spec is None for s in seqs) or host.control.can_decode_grammar
    if host.config.decode_in_control is not False and in_control:
        yield from _decode_in_control(host, inst, seqs)  # the control layer runs grammars from their specs
    else:
        for seq in seqs:
            if seq.grammar_spec is not None:
                with _grammar_errors():
                    seq.grammar = host.grammars.get().matcher(seq.grammar_spec)  # type: ignore[union-attr]
        yield from _forward_per_token(host, inst, seqs)
    _release(host, inst, seqs)
    return [_result(s) for s in seqs]


def _allocate(host: Host, inst: InstanceState, seqs: list[Sequence], room: list[int]) -> HostTaskGen:
    """Pages for each sequence's pending tokens and `room` more tokens after them."""
    page_size = host.model.page_size
    need = [max(0, -(-(s.context_len + len(s.pending) + r) // page_size) - len(s.pages)) for s, r in zip(seqs, room)]
    wanted = []
    for seq, num_pages in zip(seqs, need):
        if num_pages:
            try:
                wanted.append((seq, host.control.allocate_pages(inst.id, num_pages)))
            except ControlError as error:  # a quota refused at once: this sequence's error value, not the call's
                _fail(seq, inst, "allocating pages", error)
    if wanted:
        outcomes = yield [future for _, future in wanted]
        for (seq, _), pages in zip(wanted, outcomes):
            if isinstance(pages, BaseException):
                _fail(seq, inst, "allocating pages", pages)
            else:
                seq.pages.extend(pages)
                seq.allocated.extend(pages)


def _forward_per_token(host: Host, inst: InstanceState, seqs: list[Sequence]) -> HostTaskGen:
    control, page_size = host.control, host.model.page_size
    while any(s.active for s in seqs):
        active = [s for s in seqs if s.active]
        yield from _allocate(host, inst, active, [0] * len(active))
        stepping, futures = [], []
        for seq in (s for s in active if s.active):
            try:
                command = _command(seq, page_size)
            except GrammarError as error:
                seq.error = str(error)
                continue
            try:
                futures.append(control.forward(inst.id, command))
            except ControlError as error:
                _fail(seq, inst, "forward", error)
                continue
            stepping.append(seq)
        outcomes = yield futures
        for seq, outcome in zip(stepping, outcomes):
            if isinstance(outcome, BaseException):
                _fail(seq, inst, "forward", outcome)
                continue
            output = outcome.outputs[0]
            _accept(seq, inst, output.token_id, output, host.model.max_context_len)


def _decode_in_control(host: Host, inst: InstanceState, seqs: list[Sequence]) -> HostTaskGen:
    """Each round gives every active sequence pages for up to decode_room_pages more tokens and one control-layer
    decode; its tokens stream back and are accepted here (stop strings, detokenization, streaming). A decode
    that has used half its room is given more while it runs (extend_decode), so it does not stop for the
    round trip of an allocation and a new decode (one to two steps; every 64 tokens in a front end). That room
    is taken only if free (try_allocate_pages: never a wait or a preemption of others); when it is not, the
    decode ends at its room and the next round allocates as before."""
    control, model = host.control, host.model
    room_tokens = host.config.decode_room_pages * model.page_size
    marks = inst.trace_marks  # a traced request's (app/request_trace.py): the first decode sent and answered
    top_ups: TopUps = {}
    declined: set[int] = set()  # id(seq) whose room was not free this round: no more tries until the next
    while any(s.active for s in seqs):
        active = [s for s in seqs if s.active]
        room = [max(0, min(s.num_slots_wanted(model.max_context_len), room_tokens)) for s in active]
        yield from _allocate(host, inst, active, room)
        streams: dict[int, tuple[Sequence, DecodeStream]] = {}
        for seq in (s for s in active if s.active):
            try:
                streams[id(seq)] = (seq, control.decode(inst.id, DecodeRequest(
                    token_ids=tuple(seq.pending), position=seq.position, page_ids=tuple(seq.pages),
                    context_len=seq.context_len, sampling=_with_output(seq),
                    max_new_tokens=seq.max_tokens - len(seq.generated), stop_token_ids=seq.stop_token_ids,
                    grammar=_resumed(seq.grammar_spec, seq.generated))))
            except ControlError as error:
                _fail(seq, inst, "forward", error)
        if marks is not None:
            marks.setdefault("submitted", time.monotonic())
        while streams:
            for key, (seq, stream) in list(streams.items()):
                if marks is not None and "received" not in marks and stream.first_output_at is not None:
                    marks["received"] = stream.first_output_at
                ended = stream.done.done()  # read first: every output is pushed before the end is settled
                for output in stream.drain():
                    if seq.active:
                        _accept(seq, inst, output.token_id, output, model.max_context_len)
                if not seq.active and not ended and not stream.stop_requested:
                    control.stop_decode(inst.id, stream)  # a stop string, or the host's own limits
                if ended:
                    error = stream.done.exception()
                    if error is not None and seq.active:
                        _fail(seq, inst, "forward", error)
                    elif seq.active and stream.done.result() == END_STOP:  # its grammar allows nothing more
                        seq.finish_reason = "stop"
                        _end_stream(seq, inst)
                    del streams[key]
                elif key not in top_ups and key not in declined:
                    start_top_up(host, inst, seq, room_tokens, top_ups)
            extend_decodes(host, inst, streams, top_ups, declined)
            if streams:
                waiter = wait_any([stream for _, stream in streams.values()])
                if waiter is not None:
                    yield waiter
        if top_ups:  # answered at once by the control layer: every page allocated is the sequence's from here on
            outcomes = yield [future for _, future in top_ups.values()]
            for (seq, _), pages in zip(top_ups.values(), outcomes):
                take_top_up(host, inst, seq, pages)
            top_ups.clear()
        declined.clear()


def _with_output(seq: Sequence) -> SamplingParams:
    """seq's parameters; with penalties, also the output so far (the control layer adds each new token)."""
    return dataclasses.replace(seq.params, output_token_ids=tuple(seq.generated)) if seq.penalized else seq.params


def _resumed(spec: GrammarSpec | None, generated: list[int]) -> GrammarSpec | None:
    """spec after the tokens a decode of an earlier round generated (none ended it, so the grammar took each)."""
    if spec is None or not generated:
        return spec
    return dataclasses.replace(spec, accepted_token_ids=tuple(generated))


def _release(host: Host, inst: InstanceState, seqs: list[Sequence]) -> None:
    """Frees what the call allocated and no context uses: all of it after an error, else the room pages past
    the context (the pages then hold exactly context_len tokens, as the result says)."""
    page_size = host.model.page_size
    for seq in seqs:
        if seq.finish_reason == FINISH_EVICTED:
            seq.pages, seq.context_len, unused = [], 0, []  # every page of the instance was dropped
        elif seq.error is not None:
            unused = seq.allocated
        else:
            num_kept, allocated = -(-seq.context_len // page_size), set(seq.allocated)
            unused = [p for p in seq.pages[num_kept:] if p in allocated]
            seq.pages = seq.pages[:num_kept]
        if unused:
            free_later(host.control, inst.id, unused)


def functions(host: Host) -> list[HostFunction]:
    def generate(inst: InstanceState, request: dict[str, Any]) -> HostTaskGen:
        seq = _sequence(request, host)
        results = yield from run_sequences(host, inst, [seq])
        return results[0]

    def generate_all(inst: InstanceState, requests: list[dict[str, Any]],
                     options: dict[str, Any] = DEFAULT_OPTIONS) -> HostTaskGen:
        limit = host.config.max_generate_batch
        if len(requests) > limit:
            return [("err", f"at most {limit} requests per generate-all")] * len(requests)
        seqs: list[Sequence | None] = []
        errors: dict[int, str] = {}
        for i, request in enumerate(requests):
            try:
                seqs.append(_sequence(request, host, options))
            except (GuestError, ControlError, ValueError) as error:
                seqs.append(None)
                errors[i] = str(error)
        results = yield from run_sequences(host, inst, [s for s in seqs if s is not None])
        answers, it = [], iter(results)
        for i, seq in enumerate(seqs):
            answers.append(("err", errors[i]) if seq is None else next(it))
        return answers

    return [
        HostFunction("generate", "generate", generate, GENERATION_RESULT, (GENERATE_REQUEST,)),
        HostFunction("generate", "generate-all", generate_all, ("list", GENERATION_RESULT),
                     (("list", GENERATE_REQUEST),)),
        HostFunction("generate", "generate-all-with", generate_all, ("list", GENERATION_RESULT),
                     (("list", GENERATE_REQUEST), GENERATE_OPTIONS)),
    ]

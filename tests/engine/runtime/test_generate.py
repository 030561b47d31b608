"""The host-side decode loop (generate / generate-all), driven directly against the fake control."""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Iterator

import pytest

from pie_server.engine.control.api import ControlError
from pie_server.engine.control.decoding import DecodeRequest
from pie_server.engine.grammar import GrammarSpec
from pie_server.engine.runtime import api_generate
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.messages import Text
from pie_server.engine.step import SamplingParams
from pie_server.engine.types import InstanceId
from tests.engine.runtime.conftest import MODEL, PAGE_SIZE
from tests.engine.runtime.fakes import ByteTokenizer, FakeControl

GREEDY = {"temperature": 0.0, "top-k": 0, "top-p": 1.0, "min-p": 0.0, "seed": None, "presence-penalty": 0.0,
          "frequency-penalty": 0.0, "repetition-penalty": 1.0, "prompt-token-ids": [], "output-token-ids": [],
          "logit-bias": [], "allowed-token-ids": None, "num-logprobs": None}


def request(**fields: Any) -> dict[str, Any]:
    base = {"page-ids": [], "last-page-len": 0, "input-token-ids": list(b"ab"), "position": 0, "sampling": GREEDY,
            "max-tokens": 5, "stop-token-ids": [], "stop-strings": [], "ignore-eos": False, "constraint": None,
            "stream-channel": None}
    base.update(fields)
    return base


def drive(task: Any) -> Any:
    """Run a host task to completion, blocking on the futures it waits for."""
    value: Any = None
    while True:
        try:
            waited = task.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(waited, list):
            value = [f.exception() or f.result() for f in waited]
        else:
            value = waited.result(timeout=10)


@pytest.fixture(params=[True, False], ids=["decode-in-control", "forward-per-token"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[Host, InstanceState, FakeControl, dict[str, Any]]]:
    """Every test runs on both paths of the host-side generate; they must agree exactly."""
    control = FakeControl(num_pages=64, page_size=PAGE_SIZE)
    host = Host(control=control, tokenizer=ByteTokenizer(), model=MODEL,
                config=RuntimeConfig(decode_in_control=request.param),
                call_later=lambda delay, fn: None, run_blocking=lambda fn: Future())
    inst = InstanceState(id=InstanceId("gen"), program_hash="", arguments=(), tenant="t", deadline=1e18)
    control.open_instance(inst.id)
    functions = {f.name: f.impl for f in api_generate.functions(host)}
    yield host, inst, control, functions
    control.close_instance(inst.id)
    assert control.num_free_pages == control.info.num_pages
    control.stop()


def test_generate_runs_until_max_tokens_and_reports_pages(setup: Any) -> None:
    _, inst, control, fns = setup
    tag, gen = drive(fns["generate"](inst, request(**{"stream-channel": 3})))
    assert tag == "ok"
    assert gen["token-ids"] == list(b"cdefg") and gen["text"] == "cdefg" and gen["finish-reason"] == "length"
    # 2 prompt tokens + 4 generated tokens have KV; the last sampled token is pending
    assert gen["pending-token-ids"] == [ord("g")] and gen["next-position"] == 6
    assert len(gen["page-ids"]) == 2 and gen["last-page-len"] == 2
    assert "".join(m.text for m in iter(inst.outbox.try_get, None) if isinstance(m, Text)) == "cdefg"
    commands = [c for i, c in control.commands if i == inst.id]
    assert [list(c.token_ids) for c in commands] == [list(b"ab"), [ord("c")], [ord("d")], [ord("e")], [ord("f")]]
    assert [c.last_page_len for c in commands] == [2, 3, 4, 1, 2]


def test_penalties_see_the_output_so_far_in_every_forward(setup: Any) -> None:
    """On both paths (in the control layer: across its rounds of one page each), each forward's parameters hold
    the tokens generated before it and the prompt, and nothing is queued ahead of a token."""
    _, inst, control, fns = setup
    tag, gen = drive(fns["generate"](inst, request(**{"max-tokens": 16, "sampling": {
        **GREEDY, "frequency-penalty": 0.5}})))
    assert tag == "ok" and gen["token-ids"] == list(b"cdefghijklmnopqr")
    params = [c.outputs[0].sampling for i, c in control.commands if i == inst.id]
    assert [p.output_token_ids for p in params] == [tuple(b"cdefghijklmnopqr"[:n]) for n in range(16)]
    assert all(p.prompt_token_ids == tuple(b"ab") and p.frequency_penalty == 0.5 for p in params)


def test_stop_string_across_tokens_is_cut_and_never_streamed(setup: Any) -> None:
    _, inst, _, fns = setup
    tag, gen = drive(fns["generate"](inst, request(**{"stop-strings": ["de"], "stream-channel": 0, "max-tokens": 10})))
    assert tag == "ok" and gen["finish-reason"] == "stop" and gen["text"] == "c"
    streamed = "".join(m.text for m in iter(inst.outbox.try_get, None) if isinstance(m, Text))
    assert streamed == "c"


def test_eos_stops_unless_ignored(setup: Any) -> None:
    host, inst, control, fns = setup
    eos = MODEL.eos_token_ids[0]
    prompt = [MODEL.vocab_size - 2]  # the fake samples 255, then 0 (= eos)
    tag, gen = drive(fns["generate"](inst, request(**{"input-token-ids": prompt, "max-tokens": 5})))
    assert gen["token-ids"] == [255, eos] and gen["finish-reason"] == "stop" and gen["text"] == "\ufffd"
    tag, gen = drive(fns["generate"](inst, request(**{"input-token-ids": prompt, "max-tokens": 3, "ignore-eos": True})))
    assert gen["token-ids"] == [255, eos, 1] and gen["finish-reason"] == "length"


def test_continuing_from_a_previous_generation(setup: Any) -> None:
    _, inst, _, fns = setup
    _, first = drive(fns["generate"](inst, request(**{"max-tokens": 3})))
    follow = request(**{"page-ids": first["page-ids"], "last-page-len": first["last-page-len"],
                        "input-token-ids": first["pending-token-ids"], "position": first["next-position"]})
    _, second = drive(fns["generate"](inst, follow))
    assert second["token-ids"] == list(b"fghij")
    assert second["page-ids"][:len(first["page-ids"])] == first["page-ids"]


def test_generate_all_batches_sequences_and_isolates_bad_requests(setup: Any) -> None:
    _, inst, control, fns = setup
    results = drive(fns["generate-all"](inst, [request(), request(**{"max-tokens": 0}), request(**{"max-tokens": 2})]))
    assert results[0][0] == "ok" and results[2][0] == "ok"
    assert results[1] == ("err", "max-tokens must be at least 1")
    assert results[2][1]["token-ids"] == list(b"cd")


def test_bad_inputs_are_errors(setup: Any) -> None:
    _, inst, _, fns = setup
    from pie_server.engine.runtime.hostfn import GuestError
    with pytest.raises(GuestError, match="outside the vocabulary"):
        drive(fns["generate"](inst, request(**{"input-token-ids": [MODEL.vocab_size]})))
    with pytest.raises(GuestError, match="last-page-len"):
        drive(fns["generate"](inst, request(**{"page-ids": [0], "last-page-len": 0})))


LOGPROBS = {**GREEDY, "num-logprobs": 1}


def test_generate_all_with_streams_each_deltas_logprobs(setup: Any) -> None:
    """stream-logprobs: every delta is an event with its own tokens' logprobs; together, the result's."""
    import json

    from pie_server.engine.runtime.messages import Event

    _, inst, _, fns = setup
    options = {"skip-special-tokens": False, "spaces-between-special-tokens": True, "stream-logprobs": True}
    [(tag, gen)] = drive(fns["generate-all-with"](inst, [request(**{"stream-channel": 2, "sampling": LOGPROBS,
                                                                    "max-tokens": 4})], options))
    events = [json.loads(m.json) for m in iter(inst.outbox.try_get, None) if isinstance(m, Event)]
    assert tag == "ok" and len(events) == 4 and all(e["type"] == "delta" and e["channel"] == 2 for e in events)
    assert [e["text"] for e in events] == list(gen["text"])  # one byte token per delta here
    assert [lp[0] for e in events for lp in e["logprobs"]] == gen["token-ids"]
    assert [len(e["logprobs"]) for e in events] == [1, 1, 1, 1]
    plain = dict(options, **{"stream-logprobs": False})  # without it: text messages, as generate-all
    drive(fns["generate-all-with"](inst, [request(**{"stream-channel": 2, "sampling": LOGPROBS})], plain))
    assert all(isinstance(m, Text) for m in iter(inst.outbox.try_get, None))


def test_generate_all_with_passes_detokenization_options(setup: Any) -> None:
    host, inst, _, fns = setup
    asked: list[dict[str, bool]] = []
    new_decoder = host.tokenizer.new_decoder
    host.tokenizer.new_decoder = lambda **kwargs: asked.append(kwargs) or new_decoder()  # type: ignore[method-assign]
    options = {"skip-special-tokens": True, "spaces-between-special-tokens": False, "stream-logprobs": False}
    drive(fns["generate-all-with"](inst, [request(), request()], options))
    assert asked == [{"skip_special_tokens": True, "spaces_between_special_tokens": False}] * 2


def test_spaces_between_special_tokens_joins_added_tokens_raw() -> None:
    """vLLM's spaces_between_special_tokens=false on a decoder that joins tokens with spaces (WordPiece)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pie_server.engine.runtime.tokenizer import EngineTokenizerAdapter
    from pie_server.engine.tokenizer import Tokenizer

    vocab = {"hello": 0, "world": 1, "[CLS]": 2, "[SEP]": 3, "[UNK]": 4}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    adapter = EngineTokenizerAdapter(Tokenizer(PreTrainedTokenizerFast(
        tokenizer_object=raw, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")))

    def text(**options: bool) -> str:
        decoder = adapter.new_decoder(**options)
        return "".join(decoder.add([i]) for i in [0, 2, 3, 1, 3]) + decoder.flush()

    assert text() == "hello [CLS] [SEP] world [SEP]"
    assert text(spaces_between_special_tokens=False) == "hello [CLS][SEP] world [SEP]"


def test_a_control_that_cannot_run_grammars_refuses_a_decode_with_one() -> None:
    """decode_by_forwards (the fakes' decode) has no compiler: a grammar it was not given is an error, never
    silently dropped (the runtime sends such grammars forward by forward instead: can_decode_grammar)."""
    control = FakeControl(num_pages=8, page_size=PAGE_SIZE)
    control.open_instance(InstanceId("g"))
    pages = control.allocate_pages(InstanceId("g"), 2).result(timeout=10)
    with pytest.raises(ControlError, match="cannot decode under a grammar"):
        control.decode(InstanceId("g"), DecodeRequest(token_ids=[1], position=0, page_ids=pages, context_len=0,
                                                      sampling=SamplingParams(), max_new_tokens=2,
                                                      grammar=GrammarSpec("regex", "[a-c]")))
    control.close_instance(InstanceId("g"))
    control.stop()


class WireControl(FakeControl):
    """A Control whose call_later sends free_pages without answering (as RemoteControl does before the engine
    core's reply arrives): the call is held until the test delivers it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: list[tuple[Any, list[int], Future[None]]] = []

    def call_later(self, method: str, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if method == "free_pages":
            self.sent.append((args[0], list(args[1]), future))
            return future
        future.set_result(getattr(self, method)(*args))
        return future


def test_a_generate_frees_its_room_pages_without_waiting_for_the_reply() -> None:
    control = WireControl(num_pages=64, page_size=PAGE_SIZE)
    host = Host(control=control, tokenizer=ByteTokenizer(), model=MODEL, config=RuntimeConfig(),
                call_later=lambda delay, fn: None, run_blocking=lambda fn: Future())
    inst = InstanceState(id=InstanceId("gen"), program_hash="", arguments=(), tenant="t", deadline=1e18)
    control.open_instance(inst.id)
    generate = {f.name: f.impl for f in api_generate.functions(host)}["generate"]
    prompt = [MODEL.vocab_size - 2]  # the fake samples 255, then eos: 2 tokens of KV, far fewer than 40 allow
    tag, gen = drive(generate(inst, request(**{"input-token-ids": prompt, "max-tokens": 40})))
    assert tag == "ok" and gen["finish-reason"] == "stop"  # returned while the free is still on the wire
    [(instance_id, freed, reply)] = control.sent
    assert instance_id == inst.id and freed and not set(freed) & set(gen["page-ids"])
    control.free_pages(instance_id, freed)  # the core serves it ...
    reply.set_exception(ControlError("instance closing"))  # ... and the expected error is dropped quietly
    control.close_instance(inst.id)
    assert control.num_free_pages == control.info.num_pages
    control.stop()


def test_a_traced_generation_marks_when_its_decode_went_out_and_its_first_token_came_back() -> None:
    """A request trace's marks (app/request_trace.py) from the generate path: "submitted" when the decode went to
    the control layer, "received" when its first output arrived (the push's time, not the drain's); an
    untraced instance gets none."""
    control = FakeControl(num_pages=64, page_size=PAGE_SIZE)
    host = Host(control=control, tokenizer=ByteTokenizer(), model=MODEL, config=RuntimeConfig(decode_in_control=True),
                call_later=lambda delay, fn: None, run_blocking=lambda fn: Future())
    generate = {f.name: f.impl for f in api_generate.functions(host)}["generate"]
    for traced in (True, False):
        inst = InstanceState(id=InstanceId(f"gen-{traced}"), program_hash="", arguments=(), tenant="t", deadline=1e18)
        control.open_instance(inst.id)
        marks: dict[str, float] = {"admitted": time.monotonic()}
        if traced:
            inst.trace_marks = marks
        tag, _ = drive(generate(inst, request()))
        done = time.monotonic()
        assert tag == "ok"
        if traced:
            assert list(marks) == ["admitted", "submitted", "received"]
            assert marks["admitted"] <= marks["submitted"] <= marks["received"] <= done
        else:
            assert list(marks) == ["admitted"]
        control.close_instance(inst.id)
    control.stop()


class DecodeCountingControl(FakeControl):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_decodes = 0

    def decode(self, instance_id: InstanceId, request: DecodeRequest) -> Any:
        self.num_decodes += 1
        return super().decode(instance_id, request)


def _generate_in_control(control: FakeControl, room_pages: int, max_tokens: int) -> tuple[InstanceState, Any]:
    """A generate of max_tokens after the prompt [10, 11], decoding in the control layer with a first room of
    room_pages pages: its instance and its (tag, value)."""
    host = Host(control=control, tokenizer=ByteTokenizer(), model=MODEL,
                config=RuntimeConfig(decode_in_control=True, decode_room_pages=room_pages),
                call_later=lambda delay, fn: None, run_blocking=lambda fn: Future())
    inst = InstanceState(id=InstanceId("gen"), program_hash="", arguments=(), tenant="t", deadline=1e18)
    control.open_instance(inst.id)
    generate = {f.name: f.impl for f in api_generate.functions(host)}["generate"]
    return inst, drive(generate(inst, request(**{"input-token-ids": [10, 11], "max-tokens": max_tokens})))


def test_a_decode_gets_more_room_while_it_runs_so_a_long_generation_is_one_decode() -> None:
    """Decoding in the control layer, the host allocates a running decode's next room once it has used half of
    its room (extend_decode), instead of letting it end there and decoding again after an allocation (a round
    trip that stalls the sequence). Steps slow enough for the host to keep up: one decode for 40 tokens over a
    room of 16; the tokens, pages and freed pages as without it."""
    control = DecodeCountingControl(num_pages=64, page_size=PAGE_SIZE, step_delay_s=0.015)
    inst, (tag, gen) = _generate_in_control(control, room_pages=4, max_tokens=40)
    assert tag == "ok" and gen["finish-reason"] == "length"
    assert gen["token-ids"] == list(range(12, 52))
    assert control.num_decodes == 1 and control.extensions  # 2 + 16 slots at first, 41 needed
    # 2 prompt + 39 generated tokens have KV (the last one is pending): 11 pages, the unused room freed
    assert len(gen["page-ids"]) == 11 and gen["last-page-len"] == 1
    assert control.num_free_pages == control.info.num_pages - 11
    control.close_instance(inst.id)
    assert control.num_free_pages == control.info.num_pages
    control.stop()


def test_a_long_decodes_room_grows_so_it_asks_for_room_geometrically_less_often() -> None:
    """Each next room is as large as what the sequence has generated (from the first room up to MAX_ROOM_GROWTH
    times it): 160 tokens from a first room of one page take a handful of extensions, not one per page, and the
    unused room is still freed at the end."""
    from pie_server.engine.runtime.decode_room import MAX_ROOM_GROWTH

    control = DecodeCountingControl(num_pages=128, page_size=PAGE_SIZE, step_delay_s=0.004)
    inst, (tag, gen) = _generate_in_control(control, room_pages=1, max_tokens=160)
    assert tag == "ok" and gen["finish-reason"] == "length"
    assert gen["token-ids"] == [12 + k for k in range(160)]
    sizes = [len(pages) for _, pages in control.extensions]
    assert control.num_decodes == 1
    # growing up to the cap (in pages of one); the last one only what max-tokens still needs
    assert sizes[:-1] == sorted(sizes[:-1]) and max(sizes) == MAX_ROOM_GROWTH, sizes
    assert len(sizes) <= 12, sizes  # a room of one page each time: about 40
    # 2 prompt + 159 generated tokens have KV: the pages that hold them, the unused room freed
    assert len(gen["page-ids"]) == -(-161 // PAGE_SIZE)
    assert control.num_free_pages == control.info.num_pages - len(gen["page-ids"])
    control.close_instance(inst.id)
    control.stop()

"""Controller.decode under a grammar (DecodeRequest.grammar): every forward samples under the mask of what the
grammar allows after the tokens before it, a grammar that allows nothing more ends the decode (stop), a decode
resumed after its room ran out goes on where the grammar was, and a broken or unknown grammar is an error of
that decode only. Over a byte vocabulary (ids 0-255 are the bytes, 256 is EOS) and the fake executor, which
samples the first token its mask allows from the one it would pick."""
from __future__ import annotations

import re

import pytest

from tests.engine.control.byte_grammar import EOS, GRAMMARS, VOCAB_SIZE
from tests.engine.control.conftest import Controllers
from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.api import ControlError
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import END_LENGTH, END_ROOM, END_STOP, DecodeRequest, DecodeStream
from pie_server.engine.grammar import MIN_POOLED_MASKS, GrammarSpec, LazyCompiler
from pie_server.engine.step import SamplingParams
from pie_server.engine.types import InstanceId

pytestmark = [pytest.mark.timeout(60), pytest.mark.parametrize("pipeline", [False, True], ids=["serial", "pipelined"])]
PAGE_SIZE = 4
PROMPT = list(b"say: ")


def _make(controllers: Controllers, pipeline: bool, grammars: LazyCompiler | None = GRAMMARS,
          num_pages: int = 32) -> tuple[Controller, FakeExecutor]:
    executor = FakeExecutor(num_pages=num_pages, page_size=PAGE_SIZE, vocab_size=VOCAB_SIZE)
    controller = Controller(executor, ControlConfig(pipeline=pipeline), grammars)
    controllers.made.append(controller)
    controller.start()
    return controller, executor


def _open(controller: Controller, name: str, num_pages: int) -> tuple[InstanceId, list[int]]:
    instance = InstanceId(name)
    controller.open_instance(instance)
    return instance, controller.allocate_pages(instance, num_pages).result(timeout=10)


def _request(pages: list[int], grammar: GrammarSpec | None, max_new_tokens: int = 50,
             token_ids: list[int] = PROMPT, context_len: int = 0) -> DecodeRequest:
    return DecodeRequest(token_ids=token_ids, position=context_len, page_ids=pages, context_len=context_len,
                         sampling=SamplingParams(), max_new_tokens=max_new_tokens, stop_token_ids=frozenset({EOS}),
                         grammar=grammar)


def _text(stream: DecodeStream) -> tuple[str, str]:
    end = stream.done.result(timeout=10)
    return bytes(o.token_id for o in stream.drain() if o.token_id < 256).decode(), end


def test_every_token_follows_the_grammar_and_its_end_stops_the_decode(controllers: Controllers,
                                                                        pipeline: bool) -> None:
    controller, executor = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    num_commands = executor.num_commands
    text, end = _text(controller.decode(instance, _request(pages, GrammarSpec("regex", r"[a-c]{3}-[0-9]{2}"))))
    # Unmasked, the fake writes each input token + 1 (" " -> "!"): only the masks make it follow the regex.
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", text) and end == END_STOP, text
    assert executor.num_commands - num_commands == 6  # one forward per token, none after the grammar's end
    assert executor.num_fed == 0  # never speculated: each forward's mask needs the token before it
    controller.close_instance(instance)


def test_without_a_grammar_the_same_decode_ignores_it(controllers: Controllers, pipeline: bool) -> None:
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    text, end = _text(controller.decode(instance, _request(pages, None, max_new_tokens=6)))
    assert text == "!\"#$%&" and end == END_LENGTH  # the sabotage check of the test above
    controller.close_instance(instance)


def test_a_resumed_decode_goes_on_from_the_accepted_tokens(controllers: Controllers, pipeline: bool) -> None:
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    regex = r"(ab|ba)c{4}"
    # Two pages hold the 5 prompt tokens and 3 new ones: the 4th new token is sampled with no slot left. The
    # grammar took all 4 (as the runtime's next round says: every token generated so far).
    first, end = _text(controller.decode(instance, _request(pages[:2], GrammarSpec("regex", regex))))
    assert end == END_ROOM and len(first) == 4
    spec = GrammarSpec("regex", regex, tuple(first.encode()))
    rest, end = _text(controller.decode(instance, _request(pages, spec, token_ids=[ord(first[3])],
                                                           context_len=len(PROMPT) + 3)))
    assert re.fullmatch(regex, first + rest) and end == END_STOP, first + rest
    controller.close_instance(instance)


def test_grammar_decodes_beside_plain_ones_keep_their_own_rules(controllers: Controllers, pipeline: bool) -> None:
    controller, executor = _make(controllers, pipeline)
    opened = [_open(controller, name, 8) for name in "abcd"]
    # A mask per position: a grammar decode queued ahead of its token (as the plain ones are) would sample
    # under the mask of the position before.
    streams = [controller.decode(instance, _request(pages, GrammarSpec("regex", "(xy){4}") if i % 2 else None,
                                                    max_new_tokens=8))
               for i, (instance, pages) in enumerate(opened)]
    results = [_text(stream) for stream in streams]
    assert [end for _, end in results] == [END_LENGTH, END_STOP] * 2
    assert all(text == "!\"#$%&'(" for text, _ in results[::2])
    assert all(text == "xyxyxyxy" for text, _ in results[1::2])
    assert (executor.num_fed > 0) == pipeline  # the plain ones are still fed on the device
    for instance, _ in opened:
        controller.close_instance(instance)


def test_many_grammar_decodes_get_their_masks_together(controllers: Controllers, pipeline: bool) -> None:
    """From MIN_POOLED_MASKS decodes on, a delivery computes their next masks in llguidance's thread pool."""
    controller, _ = _make(controllers, pipeline, num_pages=4 * (MIN_POOLED_MASKS + 4))
    opened = [_open(controller, f"i{i}", 4) for i in range(MIN_POOLED_MASKS + 4)]
    streams = [controller.decode(instance, _request(pages, GrammarSpec("regex", "(xy){4}" if i % 3 else "[0-9]{6}")))
               for i, (instance, pages) in enumerate(opened)]
    for i, stream in enumerate(streams):
        assert _text(stream) == ("xyxyxyxy" if i % 3 else "012345", END_STOP)
    for instance, _ in opened:
        controller.close_instance(instance)


def test_bad_grammars_fail_their_decode_only(controllers: Controllers, pipeline: bool) -> None:
    controller, _ = _make(controllers, pipeline)
    instance, pages = _open(controller, "a", 8)
    with pytest.raises(ControlError, match="invalid JSON schema|not valid JSON"):
        controller.decode(instance, _request(pages, GrammarSpec("json-schema", "{not json")))
    with pytest.raises(ControlError, match="doesn't satisfy the grammar"):  # an accepted token it rejects
        controller.decode(instance, _request(pages, GrammarSpec("regex", "[a-c]+", (ord("z"),))))
    text, end = _text(controller.decode(instance, _request(pages, GrammarSpec("regex", "[a-c]{2}"))))
    assert re.fullmatch("[a-c]{2}", text) and end == END_STOP  # the instance and its pages are fine
    controller.close_instance(instance)


def test_a_control_layer_without_a_compiler_refuses_grammars(controllers: Controllers, pipeline: bool) -> None:
    controller, _ = _make(controllers, pipeline, grammars=None)
    assert not controller.can_decode_grammar
    instance, pages = _open(controller, "a", 8)
    with pytest.raises(ControlError, match="no grammar compiler"):
        controller.decode(instance, _request(pages, GrammarSpec("regex", "[a-c]{2}")))
    controller.close_instance(instance)

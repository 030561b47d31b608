"""Encoding to and decoding from wasmtime's C component values."""
from __future__ import annotations

import ctypes

import pytest

from pie_server.engine.runtime import values
from pie_server.engine.runtime.api_forward import FORWARD_REQUEST, OUTPUTS_RESULT
from pie_server.engine.runtime.api_generate import GENERATION_RESULT

SAMPLE = {"temperature": 0.5, "top-k": 3, "top-p": 0.75, "min-p": 0.0, "seed": 2**40, "presence-penalty": 0.0,
          "frequency-penalty": 1.5, "repetition-penalty": 1.0, "prompt-token-ids": [4, 5],
          "output-token-ids": [], "logit-bias": [(3, 1.5), (9, -2.0)], "allowed-token-ids": [1, 2, 3],
          "num-logprobs": 2}
REQUEST = {"token-ids": [5, 6, 7], "positions": [0, 1, 2], "page-ids": [0, 1], "last-page-len": 3,
           "attention-mask": [[True, False], [False, True]],
           "outputs": [{"index": 2, "kind": ("sample", SAMPLE)}, {"index": 1, "kind": ("distribution", 8)}]}


def _roundtrip(schema: values.Schema, value: object, compiled: bool) -> object:
    slot = ctypes.create_string_buffer(values.VAL_SIZE)
    values.encode_into(schema, value, slot)
    try:
        if compiled:
            return values.decode_args_with([values.compile_decoder(schema)], slot, 1)[0]
        return values.decode_args(slot, 1)[0]
    finally:
        values.ffi.wasmtime_component_val_delete(ctypes.cast(slot, ctypes.POINTER(values.ffi.wasmtime_component_val_t)))


@pytest.mark.parametrize("compiled", [False, True])
def test_forward_request_roundtrip(compiled: bool) -> None:
    assert _roundtrip(FORWARD_REQUEST, REQUEST, compiled) == REQUEST


def test_results_roundtrip() -> None:
    outputs = ("ok", [{"token-id": 7, "logprob": -0.5, "top-logprobs": [{"token-id": 7, "logprob": -0.5}],
                       "distribution": []},
                      {"token-id": None, "logprob": None, "top-logprobs": [],
                       "distribution": [{"token-id": 1, "prob": 0.25}]}])
    assert _roundtrip(OUTPUTS_RESULT, outputs, False) == outputs
    assert _roundtrip(OUTPUTS_RESULT, ("err", "bad page"), False) == ("err", "bad page")
    generation = ("ok", {"token-ids": [1, 2], "text": "h\u00e9llo \u2603", "finish-reason": "length",
                         "logprobs": [], "page-ids": [3], "last-page-len": 2, "pending-token-ids": [2],
                         "next-position": 9})
    assert _roundtrip(GENERATION_RESULT, generation, False) == generation


def test_bytes_strings_and_tuples() -> None:
    assert _roundtrip(("list", ("list", "u8")), [b"ab", b"", b"\xff"], True) == [b"ab", b"", b"\xff"]
    headers = [("content-type", "text/plain"), ("x", "")]
    assert _roundtrip(("list", ("tuple", "string", "string")), headers, False) == headers
    assert _roundtrip(("option", "u64"), 2**63, False) == 2**63
    assert _roundtrip(("list", "bool"), [True, False, True], False) == [True, False, True]


def test_encoding_rejects_wrong_shapes() -> None:
    slot = ctypes.create_string_buffer(values.VAL_SIZE)
    with pytest.raises(TypeError):
        values.encode_into(("result", None, "string"), ("maybe", None), slot)
    with pytest.raises(TypeError):
        values.encode_into(("variant", {"a": None}), ("b", None), slot)


def test_memo_decoder_caches_only_pointer_free_records() -> None:
    from pie_server.engine.runtime.api_forward import SAMPLING_PARAMS
    conversions: list[dict] = []

    def convert(record: dict) -> tuple:
        conversions.append(record)
        return tuple(sorted((k, str(v)) for k, v in record.items()))
    decoder = [values.compile_decoder(("memo", SAMPLING_PARAMS, convert))]
    plain = dict(SAMPLE, **{"prompt-token-ids": [], "logit-bias": [], "allowed-token-ids": None, "seed": None, "num-logprobs": None})
    other = dict(plain, temperature=0.25)
    slot = ctypes.create_string_buffer(values.VAL_SIZE)
    seen = []
    for record in (plain, plain, other, SAMPLE, SAMPLE):
        values.encode_into(SAMPLING_PARAMS, record, slot)
        seen.append(values.decode_args_with(decoder, slot, 1)[0])
    assert seen[0] == seen[1] != seen[2] and seen[3] == seen[4]
    assert seen[3] == convert(SAMPLE)
    # plain once, other once, SAMPLE (has lists) converted each time, + the call above
    assert len(conversions) == 2 + 2 + 1


def test_template_encoding_matches_generic_encoding() -> None:
    from pie_server.engine.step import CommandResult, OutputResult
    from pie_server.engine.runtime.api_forward import forward_result
    result = CommandResult(outputs=(OutputResult(token_id=7, logprob=-0.25), OutputResult(token_id=9, logprob=-2.0)))
    prepared = forward_result(result)
    assert isinstance(prepared, values.Prepared)
    expected = ("ok", [{"token-id": 7, "logprob": -0.25, "top-logprobs": [], "distribution": []},
                       {"token-id": 9, "logprob": -2.0, "top-logprobs": [], "distribution": []}])
    assert _roundtrip(OUTPUTS_RESULT, prepared, False) == expected
    with_top = CommandResult(outputs=(OutputResult(token_id=1, logprob=-1.0, top_logprobs=((1, -1.0),)),))
    assert forward_result(with_top)[1][0]["top-logprobs"] == [{"token-id": 1, "logprob": -1.0}]

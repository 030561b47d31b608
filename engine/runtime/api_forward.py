"""Host functions of `forward`, and the conversions between WIT records and the batch protocol."""
from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any

from pie_server.engine.control.api import ControlError, VirtualForward
from pie_server.engine.step import CommandResult, OutputResult, OutputSpec, SamplingParams
from pie_server.engine.runtime import values
from pie_server.engine.runtime.api_kv import check_token_ids
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import GuestError, HostFunction, expect
from pie_server.engine.runtime.instance import HostTaskGen, InstanceState

TOKEN_LOGPROB = ("record", ("token-id", "u32"), ("logprob", "f32"))
TOKEN_PROB = ("record", ("token-id", "u32"), ("prob", "f32"))
OUTPUT = ("record", ("token-id", ("option", "u32")), ("logprob", ("option", "f32")),
          ("top-logprobs", ("list", TOKEN_LOGPROB)), ("distribution", ("list", TOKEN_PROB)))
OUTPUTS_RESULT = ("result", ("list", OUTPUT), "string")
SAMPLING_PARAMS = ("record", ("temperature", "f32"), ("top-k", "u32"), ("top-p", "f32"), ("min-p", "f32"),
                   ("seed", ("option", "u64")), ("presence-penalty", "f32"), ("frequency-penalty", "f32"),
                   ("repetition-penalty", "f32"), ("prompt-token-ids", ("list", "u32")),
                   ("output-token-ids", ("list", "u32")), ("logit-bias", ("list", ("tuple", "u32", "f32"))),
                   ("allowed-token-ids", ("option", ("list", "u32"))), ("num-logprobs", ("option", "u32")))


class _Invalid:
    """A memoized conversion failure: re-raised at each use."""

    def __init__(self, message: str) -> None:
        self.message = message


def _convert_sampling(record: dict[str, Any], vocab_size: int) -> SamplingParams | _Invalid:
    try:
        return sampling_params(record, vocab_size)
    except (GuestError, ValueError) as error:
        return _Invalid(str(error))


def sampling_params_schema(vocab_size: int) -> tuple:
    """SAMPLING_PARAMS decoded straight to SamplingParams, memoized (the same params come on every step)."""
    return ("memo", SAMPLING_PARAMS, lambda record: _convert_sampling(record, vocab_size))


def as_sampling(value: Any, vocab_size: int) -> SamplingParams:
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, _Invalid):
        raise GuestError(value.message)
    return sampling_params(value, vocab_size)


def forward_request_schema(vocab_size: int) -> tuple:
    output_request = ("record", ("index", "u32"),
                      ("kind", ("variant", {"sample": sampling_params_schema(vocab_size), "distribution": "u32"})))
    return ("record", *FORWARD_REQUEST[1:-1], ("outputs", ("list", output_request)))


OUTPUT_REQUEST = ("record", ("index", "u32"), ("kind", ("variant", {"sample": SAMPLING_PARAMS, "distribution": "u32"})))
FORWARD_REQUEST = ("record", ("token-ids", ("list", "u32")), ("positions", ("list", "u32")),
                   ("page-ids", ("list", "u32")), ("last-page-len", "u32"),
                   ("attention-mask", ("option", ("list", ("list", "bool")))), ("outputs", ("list", OUTPUT_REQUEST)))


def sampling_params(record: dict[str, Any], vocab_size: int) -> SamplingParams:
    """WIT sampling-params -> SamplingParams; raises GuestError/ValueError on bad values."""
    for name in ("temperature", "top-p", "min-p", "presence-penalty", "frequency-penalty", "repetition-penalty"):
        expect(math.isfinite(record[name]), f"{name} must be finite")
    bias = record["logit-bias"]
    allowed = record["allowed-token-ids"]
    check_token_ids([t for t, _ in bias], vocab_size)
    expect(all(math.isfinite(b) for _, b in bias), "logit-bias values must be finite")
    if allowed is not None:
        check_token_ids(allowed, vocab_size)
    check_token_ids(record["prompt-token-ids"], vocab_size)
    check_token_ids(record["output-token-ids"], vocab_size)
    return SamplingParams(
        temperature=record["temperature"], top_k=record["top-k"], top_p=record["top-p"], min_p=record["min-p"],
        seed=record["seed"], presence_penalty=record["presence-penalty"],
        frequency_penalty=record["frequency-penalty"], repetition_penalty=record["repetition-penalty"],
        logit_bias=tuple((t, float(b)) for t, b in bias),
        allowed_token_ids=None if allowed is None else tuple(allowed),
        prompt_token_ids=tuple(record["prompt-token-ids"]), output_token_ids=tuple(record["output-token-ids"]),
        num_logprobs=record["num-logprobs"])


def virtual_forward(request: dict[str, Any], host: Host) -> VirtualForward:
    """WIT forward-request -> VirtualForward, checking the shapes the control layer cannot see."""
    token_ids, positions, page_ids = request["token-ids"], request["positions"], request["page-ids"]
    last_page_len = request["last-page-len"]
    page_size, vocab_size = host.model.page_size, host.model.vocab_size
    expect(len(token_ids) > 0, "a forward needs at least one token")
    expect(len(positions) == len(token_ids), "positions and token-ids must have the same length")
    expect(len(page_ids) > 0, "a forward needs at least one page")
    expect(0 < last_page_len <= page_size, f"last-page-len must be in [1, {page_size}]")
    context_len = (len(page_ids) - 1) * page_size + last_page_len
    expect(len(token_ids) <= context_len, "the pages (up to last-page-len) must hold all token-ids")
    expect(context_len <= host.model.max_context_len, f"context exceeds {host.model.max_context_len} tokens")
    check_token_ids(token_ids, vocab_size)
    expect(max(positions) < host.model.max_context_len, "a position exceeds the model's max context")
    mask = request["attention-mask"]
    if mask is not None:
        expect(len(mask) == len(token_ids), "attention-mask needs one row per token")
        expect(all(len(row) == context_len for row in mask), f"each attention-mask row needs {context_len} entries")
    outputs = [_output_spec(o, len(token_ids), vocab_size) for o in request["outputs"]]
    return VirtualForward(token_ids=token_ids, positions=positions, page_ids=page_ids,
                          last_page_len=last_page_len, outputs=outputs, attention_mask=mask)


def _output_spec(request: dict[str, Any], num_tokens: int, vocab_size: int) -> OutputSpec:
    index = request["index"]
    expect(index < num_tokens, f"output index {index} is not among the {num_tokens} tokens")
    case, payload = request["kind"]
    if case == "sample":
        return OutputSpec(index=index, sampling=as_sampling(payload, vocab_size))
    # Up to the whole vocabulary: k = vocab-size is the full distribution (its cost is the list it returns).
    expect(0 < payload <= vocab_size, f"distribution top-k must be in [1, {vocab_size}] (the vocabulary size)")
    return OutputSpec(index=index, distribution_top_k=payload)


def output_record(result: OutputResult) -> dict[str, Any]:
    return {"token-id": result.token_id, "logprob": result.logprob,
            "top-logprobs": [{"token-id": t, "logprob": lp} for t, lp in result.top_logprobs],
            "distribution": [{"token-id": t, "prob": p} for t, p in result.distribution]}


def command_outputs(result: CommandResult) -> list[dict[str, Any]]:
    return [output_record(o) for o in result.outputs]


_SAMPLED_TEMPLATES: dict[int, values.Template] = {}


def forward_result(result: CommandResult) -> Any:
    """("ok", outputs); outputs that are plain sampled tokens go through a prebuilt template (the hot path)."""
    outputs = result.outputs
    if not all(o.token_id is not None and o.logprob is not None and not o.top_logprobs and not o.distribution
               for o in outputs):
        return ("ok", command_outputs(result))
    template = _SAMPLED_TEMPLATES.get(len(outputs))
    if template is None:
        example = {"token-id": 0, "logprob": 0.0, "top-logprobs": [], "distribution": []}
        template = _SAMPLED_TEMPLATES[len(outputs)] = values.Template(OUTPUTS_RESULT, ("ok", [example] * len(outputs)))
    primitives: list[Any] = []
    for output in outputs:
        primitives += (output.token_id, output.logprob)
    return values.Prepared(template, primitives)


def functions(host: Host) -> list[HostFunction]:
    control = host.control
    request_schema = forward_request_schema(host.model.vocab_size)

    def forward(inst: InstanceState, request: dict[str, Any]) -> Future:
        return control.forward(inst.id, virtual_forward(request, host))  # a lean wait: forward_result()

    def forward_all(inst: InstanceState, requests: list[dict[str, Any]]) -> HostTaskGen:
        if len(requests) > host.config.max_generate_batch:
            message = f"at most {host.config.max_generate_batch} requests per forward-all"
            return [("err", message)] * len(requests)
        answers: list[Any] = [None] * len(requests)
        futures, slots = [], []
        for i, request in enumerate(requests):
            try:
                futures.append(control.forward(inst.id, virtual_forward(request, host)))
                slots.append(i)
            except (GuestError, ControlError, ValueError) as error:  # each request fails alone
                answers[i] = ("err", str(error))
        outcomes = (yield futures) if futures else []
        for i, outcome in zip(slots, outcomes):
            answers[i] = ("err", str(outcome)) if isinstance(outcome, BaseException) else ("ok", command_outputs(outcome))
        return answers

    return [
        HostFunction("forward", "forward", forward, OUTPUTS_RESULT, (request_schema,), needs_context=False,
                     finish=forward_result),
        HostFunction("forward", "forward-all", forward_all, ("list", OUTPUTS_RESULT), (("list", request_schema),),
                     needs_context=False),
    ]


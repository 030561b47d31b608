"""Generation parameters shared by chat and completion requests, validated against the served model.

The result mirrors what the default inferlet needs (see inferlets/builtin/default/README.md for the
argument format): sampling parameters in the WIT's `sampling-params` vocabulary, n, max_tokens, stops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pie_server.app.errors import invalid
from pie_server.app.openai.fields import (get_bool, get_float, get_int, get_list, get_object, get_str,
                               token_id_list)

MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    model_names: tuple[str, ...]
    vocab_size: int
    max_context_len: int

    def __post_init__(self) -> None:
        if not self.model_names or self.vocab_size <= 0 or self.max_context_len <= 0:
            raise ValueError("ModelLimits needs a model name, a vocab size and a context length")


@dataclass(frozen=True)
class Sampling:
    """Engine-side sampling, neutral values as in the WIT's sampling-params."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    num_logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "seed": self.seed, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty,
                "logit_bias": [list(pair) for pair in self.logit_bias], "num_logprobs": self.num_logprobs}


@dataclass(frozen=True)
class GenerationParams:
    n: int = 1
    max_tokens: int | None = None  # None: up to the model's context
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    # A grammar the output must follow: {"type": "json_object"} or {"type": "json_schema", "schema": {...}}.
    constraint: dict[str, Any] | None = None
    # vLLM's detokenization fields: special tokens (bos, eos, <|im_start|>, ...) are left out of the text.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


INFERLET_MODEL_PREFIX = "inferlet:"  # "model": "inferlet:NAME" runs the uploaded inferlet NAME


def check_model(body: Mapping[str, Any], limits: ModelLimits) -> str:
    """The requested model name (404 for one we do not serve; absent means the default)."""
    from pie_server.app.errors import ApiError

    name = get_str(body, "model", limits.model_names[0])
    if name.startswith(INFERLET_MODEL_PREFIX) and len(name) > len(INFERLET_MODEL_PREFIX):
        return name  # an uploaded inferlet that speaks the default inferlet's protocol (found when it runs)
    if name not in limits.model_names:
        raise ApiError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")
    return name


def parse_generation(body: Mapping[str, Any], limits: ModelLimits, num_logprobs: int | None,
                     max_tokens_names: tuple[str, ...] = ("max_tokens",)) -> GenerationParams:
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    best_of = get_int(body, "best_of", None, lo=1, hi=MAX_N)
    if best_of is not None and best_of != n:
        raise invalid("'best_of' other than n is not supported", "best_of")
    stream = get_bool(body, "stream", False)
    stream_options = get_object(body, "stream_options")
    if stream_options is not None and not stream:
        raise invalid("'stream_options' can only be set when 'stream' is true", "stream_options")
    include_usage = get_bool(stream_options or {}, "include_usage", False)
    return GenerationParams(
        n=n, max_tokens=_max_tokens(body, limits, max_tokens_names), sampling=_sampling(body, limits, num_logprobs),
        stop=_stop_strings(body), stop_token_ids=tuple(_stop_token_ids(body, limits)),
        ignore_eos=get_bool(body, "ignore_eos", False), stream=stream, include_usage=include_usage,
        skip_special_tokens=get_bool(body, "skip_special_tokens", True),
        spaces_between_special_tokens=get_bool(body, "spaces_between_special_tokens", True))


def _max_tokens(body: Mapping[str, Any], limits: ModelLimits, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = get_int(body, name, None, lo=1)
        if value is not None:
            if value >= limits.max_context_len:
                raise invalid(f"'{name}' must be below the model's context length ({limits.max_context_len})",
                              name, "context_length_exceeded")
            return value
    return None


def _sampling(body: Mapping[str, Any], limits: ModelLimits, num_logprobs: int | None) -> Sampling:
    top_k = get_int(body, "top_k", 0, lo=-1)
    return Sampling(
        temperature=get_float(body, "temperature", 1.0, lo=0.0),
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
        top_p=get_float(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        min_p=get_float(body, "min_p", 0.0, lo=0.0, hi=1.0),
        seed=get_int(body, "seed", None, lo=-(2 ** 63), hi=2 ** 64 - 1),
        presence_penalty=get_float(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=get_float(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        repetition_penalty=get_float(body, "repetition_penalty", 1.0, lo=0.0, lo_open=True),
        logit_bias=_logit_bias(body, limits),
        num_logprobs=num_logprobs)


def _logit_bias(body: Mapping[str, Any], limits: ModelLimits) -> tuple[tuple[int, float], ...]:
    bias = get_object(body, "logit_bias")
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < limits.vocab_size:
            raise invalid(f"'logit_bias' token {token} is outside the vocabulary [0, {limits.vocab_size})",
                          "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def _stop_strings(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("'stop' must be a string or an array of strings", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise invalid(f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in items if s)  # an empty stop string would end every generation at once


def _stop_token_ids(body: Mapping[str, Any], limits: ModelLimits) -> list[int]:
    value = get_list(body, "stop_token_ids")
    return [] if value is None else token_id_list(value, "stop_token_ids", limits.vocab_size)


def parse_response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """response_format -> the constraint for the inferlet (None for plain text)."""
    fmt = get_object(body, "response_format")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid("'response_format.json_schema' must be an object", "response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid("'response_format.json_schema.schema' must be an object", "response_format")
        from pie_server.app.openai.schema_check import check_json_schema

        check_json_schema(schema, "response_format")
        return {"type": "json_schema", "schema": schema}
    raise invalid("'response_format.type' must be one of 'text', 'json_object', 'json_schema'",
                  "response_format")

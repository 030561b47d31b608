"""The result of a generation, and the host request that asks for one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from wit_world.imports import generate, types

from .constraints import Constraint, to_wit as constraint_to_wit
from .stop import FINISH_EVICTED, FINISH_LENGTH, FINISH_STOP, StopCondition

_FINISH_REASONS = {types.FinishReason.STOP: FINISH_STOP, types.FinishReason.LENGTH: FINISH_LENGTH,
                   types.FinishReason.EVICTED: FINISH_EVICTED}


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated position: its token's logprob and, when asked for, the top alternatives."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Generation:
    text: str  # without eos/stop tokens, cut before a matched stop string
    token_ids: tuple[int, ...]  # every sampled token, including a final eos/stop token
    finish_reason: str  # "stop" (eos, stop token or string) or "length"
    logprobs: tuple[TokenLogprobs, ...]  # one per token when the sampler asked for num_logprobs


def joined(first: Generation, then: Generation) -> Generation:
    """One generation continued by another (after an eviction): the second one's finish reason."""
    return Generation(text=first.text + then.text, token_ids=first.token_ids + then.token_ids,
                      finish_reason=then.finish_reason, logprobs=first.logprobs + then.logprobs)


def from_wit(raw: generate.Generation) -> Generation:
    logprobs = tuple(TokenLogprobs(p.token_id, p.logprob, tuple((t.token_id, t.logprob) for t in p.top_logprobs))
                     for p in raw.logprobs)
    return Generation(text=raw.text, token_ids=tuple(raw.token_ids),
                      finish_reason=_FINISH_REASONS[raw.finish_reason], logprobs=logprobs)


def request_for(page_ids: Sequence[int], last_page_len: int, input_ids: Sequence[int], position: int,
                condition: StopCondition, sampling: types.SamplingParams, constraint: Constraint | None,
                stream_channel: int | None) -> generate.GenerateRequest:
    return generate.GenerateRequest(
        page_ids=list(page_ids), last_page_len=last_page_len, input_token_ids=list(input_ids), position=position,
        sampling=sampling, max_tokens=condition.max_tokens, stop_token_ids=list(condition.stop_token_ids),
        stop_strings=list(condition.stop_strings), ignore_eos=condition.ignore_eos,
        constraint=constraint_to_wit(constraint),
        stream_channel=stream_channel)

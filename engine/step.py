"""The message protocol between the control layer and the executor: one Batch in, one StepResult out.

Plain Python data only (no tensors), so the executor can run in-process or in another process.

KV placement invariant: a command's context is `page_ids` (physical, any order, no duplicates) filled to
`context_len = (len(page_ids) - 1) * page_size + last_page_len`. Its `token_ids` are the LAST
`len(token_ids)` slots of that context: the executor writes their K/V there, then attends each new token to
the context (causally by default: new token i sees slots [0, context_len - num_tokens + i]).
RoPE uses `positions`, which need not equal slot indices.

Pipelining: a command may take its last token from the step submitted just before (`fed_token`), still on
the device, so the next step can be submitted before this one's tokens reach the host.

The messages made per sequence per step (ForwardCommand, CommandResult, OutputResult) are frozen msgspec
Structs, the others frozen dataclasses: a Struct is built in a seventh of a frozen dataclass's time (a
ForwardCommand 0.23 against 1.76 us on the 2-core CPU machine), and the control loop builds one of each for
every running sequence at every step. Same fields, order, defaults, equality and immutability; copy one
with `msgspec.structs.replace`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import msgspec

from pie_server.engine.types import PageId, Position, TokenId

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick a token from one output position's logits.

    temperature == 0 means greedy. Penalties follow vLLM/OpenAI: presence and frequency apply to
    `output_token_ids`; repetition (multiplicative, 1.0 = off) to prompt and output tokens.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[TokenId, float], ...] = ()
    allowed_token_ids: tuple[TokenId, ...] | None = None  # a logit mask: only these may be sampled
    # The same mask as packed bits (a grammar's allowed set can be most of the vocabulary: 6 KB, not 33k ids):
    # token t may be sampled iff bit t % 8 of byte t // 8 is set (numpy's bitorder="little", which is also
    # llguidance's int32 bitmask read as bytes); at least ceil(V / 8) bytes, no bit set at or beyond V.
    allowed_token_mask: bytes | None = None
    prompt_token_ids: tuple[TokenId, ...] = ()
    output_token_ids: tuple[TokenId, ...] = ()
    num_logprobs: int | None = None  # None: no logprobs; 0: the sampled token's; N: also the top N

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.num_logprobs is not None and not 0 <= self.num_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"num_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        if self.allowed_token_mask is not None:
            if self.allowed_token_ids is not None:
                raise ValueError("give allowed tokens as ids or as a mask, not both")
            if self.allowed_token_mask.count(0) == len(self.allowed_token_mask):
                raise ValueError("allowed_token_mask allows no token")

    def with_allowed_mask(self, mask: bytes) -> "SamplingParams":
        """These parameters with allowed_token_mask = mask, built without __post_init__'s checks: for the control
        layer's grammar decodes, whose base parameters were checked when made and whose masks come from
        engine/grammar.py, which never hands out one that allows nothing (the one check that could fail; the
        sampler checks a mask's length and range again). A decode makes one per token: dataclasses.replace
        costs several times this. Not with allowed_token_ids set (the two exclude each other)."""
        assert self.allowed_token_ids is None
        params = object.__new__(SamplingParams)
        state = params.__dict__
        state.update(self.__dict__)
        state.pop("is_plain_greedy", None)  # cached from the base's fields: it depends on the mask
        state["allowed_token_mask"] = mask
        return params

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_penalized(self) -> bool:
        """A penalty reads the tokens so far (output_token_ids, and for repetition prompt_token_ids too)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @functools.cached_property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits is the whole answer: no penalties, bias, mask or logprobs. Cached (in the
        instance's __dict__, outside the fields): the sampler asks it of every output row of every step, and a
        decode's rows share one SamplingParams from step to step."""
        return self.is_greedy and self.num_logprobs is None and not self.is_penalized and not self.logit_bias \
            and self.allowed_token_ids is None and self.allowed_token_mask is None


@dataclass(frozen=True)
class OutputSpec:
    """What to return for one input token's output (the next-token prediction after it).

    Exactly one of `sampling` (sample a token) or `distribution_top_k` (return the top-K probabilities).
    """

    index: int  # into the command's token_ids
    sampling: SamplingParams | None = None
    distribution_top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.sampling is None) == (self.distribution_top_k is None):
            raise ValueError("an output wants exactly one of sampling or distribution_top_k")
        if self.distribution_top_k is not None and self.distribution_top_k <= 0:
            raise ValueError("distribution_top_k must be positive")


@dataclass(frozen=True)
class TokenRef:
    """The token sampled by output `output_index` of forward command `command_index` of the step submitted
    to the executor just before the one that holds this reference."""

    command_index: int
    output_index: int = 0

    def __post_init__(self) -> None:
        if self.command_index < 0 or self.output_index < 0:
            raise ValueError("a TokenRef's indices must be >= 0")


class ForwardCommand(msgspec.Struct, frozen=True):
    """One sequence's part of a step: a prefill chunk or a decode token (see the module invariant)."""

    token_ids: Sequence[TokenId]
    positions: Sequence[Position]
    page_ids: Sequence[PageId]
    last_page_len: int
    outputs: Sequence[OutputSpec] = ()
    # Optional custom mask, row-major [num_tokens][context_len]: True = may attend. None = causal.
    attention_mask: Sequence[Sequence[bool]] | None = None
    # When set, the LAST of token_ids is a placeholder (any id in range) that the executor replaces, on the
    # device, with the referenced token of the previous step.
    fed_token: TokenRef | None = None

    def context_len(self, page_size: int) -> int:
        return (len(self.page_ids) - 1) * page_size + self.last_page_len


@dataclass(frozen=True)
class PageCopy:
    """Copy `num_slots` KV slots (all layers) from one page to another before the step's forwards."""

    src_page_id: PageId
    dst_page_id: PageId
    src_offset: int = 0
    dst_offset: int = 0
    num_slots: int | None = None  # None: the whole page


@dataclass(frozen=True)
class PageSwap:
    """Move one page's KV (all layers) between the device pool and the host swap pool."""

    page_id: PageId
    swap_slot: int  # 0 <= swap_slot < the executor's num_swap_slots


@dataclass(frozen=True)
class Batch:
    """One step. Order of effects: swap_outs, swap_ins, page_copies, then the forwards."""

    forwards: Sequence[ForwardCommand] = ()
    page_copies: Sequence[PageCopy] = ()
    swap_outs: Sequence[PageSwap] = ()
    swap_ins: Sequence[PageSwap] = ()
    step_id: int = 0


class OutputResult(msgspec.Struct, frozen=True):
    token_id: TokenId | None = None  # the sampled token (None for a distribution output)
    logprob: float | None = None  # of token_id, from the unmodified log-softmax (vLLM's default)
    top_logprobs: tuple[tuple[TokenId, float], ...] = ()
    distribution: tuple[tuple[TokenId, float], ...] = ()  # top-K (token, probability), descending


class CommandResult(msgspec.Struct, frozen=True):
    outputs: tuple[OutputResult, ...] = ()


@dataclass(frozen=True)
class StepResult:
    results: tuple[CommandResult, ...] = ()  # one per ForwardCommand, in order
    step_id: int = 0
    elapsed_s: float = field(default=0.0, compare=False)

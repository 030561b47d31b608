"""Samplers: how the engine picks the next token (engine-side, on the executor)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from wit_world.imports import types

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class Sampler:
    """Engine-side sampling parameters; the neutral value of each knob turns it off.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 keep every token; penalties follow OpenAI
    (presence/frequency in [-2, 2]) and transformers (repetition, multiplicative, 1.0 = off).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    num_logprobs: int | None = None  # None: none; 0: the sampled token's; n: also the top n

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"seed must fit in an unsigned 64-bit integer, got {self.seed}")
        if self.num_logprobs is not None and not 0 <= self.num_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"num_logprobs must be in [0, {MAX_LOGPROBS}], got {self.num_logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_context(self) -> bool:
        """Whether the penalties need the token history."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def to_wit(self, prompt_token_ids: Sequence[int] = (), output_token_ids: Sequence[int] = (),
               allowed_token_ids: Sequence[int] | None = None) -> types.SamplingParams:
        """The WIT record. The history is only sent when a penalty needs it (it can be long)."""
        if allowed_token_ids is not None and not allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        with_context = self.uses_context
        return types.SamplingParams(
            temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
            min_p=float(self.min_p), seed=self.seed,
            presence_penalty=float(self.presence_penalty), frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            prompt_token_ids=list(prompt_token_ids) if with_context else [],
            output_token_ids=list(output_token_ids) if with_context else [],
            logit_bias=[(int(t), float(b)) for t, b in self.logit_bias.items()],
            allowed_token_ids=None if allowed_token_ids is None else [int(t) for t in allowed_token_ids],
            num_logprobs=self.num_logprobs)


@dataclass(frozen=True)
class Greedy(Sampler):
    """Always the most likely token (temperature 0)."""

    temperature: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature != 0.0:
            raise ValueError("Greedy() has temperature 0; use Sampler(temperature=...) to sample")

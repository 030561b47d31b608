"""Token sampling for one step: logits [N, V] and one OutputSpec per row -> one OutputResult per row.

Pipeline (vLLM's order), all on the logits' device and vectorised over rows:

    raw --log_softmax--> logprob, top_logprobs          (raw logprobs, vLLM's default)
    raw --softmax--> top-K distribution                 (distribution rows)
    raw --repetition--> frequency/presence --> logit_bias --> allowed-token mask   = processed
    processed --argmax--> greedy tokens
    processed / T --top-k, top-p (one sort, only rows that ask)--> min-p --> argmax(x - log E), E ~ Exp(1)

The last line is the exponential race: argmax(p_i / E_i) draws i with probability p_i. Seeded rows draw E
from their own generator seeded by (seed, len(output_token_ids)), so a row's token depends only on its
logits and params, never on the rest of the batch. Host inputs travel with one copy per dtype; every
result the host needs comes back packed in one float64 tensor (one device-to-host transfer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from itertools import chain
from typing import Sequence, TypeVar

import torch

from engine.executor.batch import OutputResult, OutputSpec, SamplingParams

# Temperatures below this are clamped (x / T would overflow); such rows are argmax in all but name.
MIN_TEMPERATURE = 1e-5
_MASK64 = (1 << 64) - 1
_T = TypeVar("_T")


def seed_key(seed: int, step: int) -> int:
    """The generator seed for step `step` of a request seeded with `seed` (splitmix64 mix, 64 bits)."""
    z = ((seed & _MASK64) ^ ((step + 1) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _flat_token_ids(rows_of_ids: Sequence[Sequence[int]], vocab_size: int, what: str) -> torch.Tensor:
    """Host int64 [sum of lengths]: r * V + t for every token t of row r (repeats kept). Validates ids."""
    ids = torch.tensor(list(chain.from_iterable(rows_of_ids)), dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in rows_of_ids], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(rows_of_ids)), lengths)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: token id {int(ids[first])} (sampling row {int(rows[first])}) "
            f"is outside the vocabulary [0, {vocab_size})"
        )
    return rows * vocab_size + ids


def ship(items: Sequence[_T], device: torch.device) -> list[_T]:
    """The dataclasses `items` with every tensor field moved to `device`: one copy per dtype."""
    if device.type == "cpu":
        return list(items)
    found = [(i, f.name, getattr(item, f.name)) for i, item in enumerate(items) for f in fields(item)]
    found = [(i, name, value) for i, name, value in found if isinstance(value, torch.Tensor)]
    updates: list[dict[str, torch.Tensor]] = [{} for _ in items]
    for dtype in {value.dtype for _, _, value in found}:
        group = [(i, name, value) for i, name, value in found if value.dtype == dtype]
        flat = torch.cat([value.reshape(-1) for _, _, value in group])
        moved = flat.pin_memory().to(device, non_blocking=True)
        for (i, name, value), part in zip(group, moved.split([v.numel() for _, _, v in group])):
            updates[i][name] = part.view(value.shape)
    return [replace(item, **update) for item, update in zip(items, updates)]


@dataclass(frozen=True)
class Penalties:
    """Penalties, logit bias and allowed-token masks of R sampling rows (flat ids are r * V + t).

    A field is None when no row uses it; rows that do not use a feature carry its neutral value.
    """

    repetition: torch.Tensor | None = None  # [R] f32
    seen_flat_ids: torch.Tensor | None = None  # prompt + output tokens of rows with repetition != 1
    frequency: torch.Tensor | None = None  # [R] f32
    presence: torch.Tensor | None = None  # [R] f32
    output_flat_ids: torch.Tensor | None = None  # output tokens (repeats counted) of rows with freq/pres
    bias_flat_ids: torch.Tensor | None = None  # unique
    bias_values: torch.Tensor | None = None  # f32, aligned with bias_flat_ids
    allowed_flat_ids: torch.Tensor | None = None
    unrestricted: torch.Tensor | None = None  # [R] bool: rows without an allowed-token list

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int) -> Penalties:
        """Host tensors for `params` (one per row); raises ValueError on out-of-vocabulary ids."""
        fields_: dict[str, torch.Tensor] = {}
        if any(p.repetition_penalty != 1.0 for p in params):
            fields_["repetition"] = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
            seen = [p.prompt_token_ids + p.output_token_ids if p.repetition_penalty != 1.0 else () for p in params]
            fields_["seen_flat_ids"] = _flat_token_ids(seen, vocab_size, "prompt/output token ids")
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            fields_["frequency"] = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)
            fields_["presence"] = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)
            outputs = [p.output_token_ids if p.frequency_penalty or p.presence_penalty else () for p in params]
            fields_["output_flat_ids"] = _flat_token_ids(outputs, vocab_size, "output token ids")
        if any(p.logit_bias for p in params):
            fields_.update(_bias_tensors(params, vocab_size))
        if any(p.allowed_token_ids is not None for p in params):
            allowed = [p.allowed_token_ids or () for p in params]
            fields_["allowed_flat_ids"] = _flat_token_ids(allowed, vocab_size, "allowed_token_ids")
            fields_["unrestricted"] = torch.tensor([p.allowed_token_ids is None for p in params])
        return cls(**fields_)

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def _bias_tensors(params: Sequence[SamplingParams], vocab_size: int) -> dict[str, torch.Tensor]:
    """logit_bias as unique flat ids and values; a token listed twice in one row keeps its last bias."""
    biases = [dict(p.logit_bias) for p in params]
    values = list(chain.from_iterable(b.values() for b in biases))
    if any(math.isnan(v) or v == math.inf for v in values):
        raise ValueError("logit_bias values must be finite or -inf")
    return {
        "bias_flat_ids": _flat_token_ids([tuple(b) for b in biases], vocab_size, "logit_bias"),
        "bias_values": torch.tensor(values, dtype=torch.float32),
    }


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """float32 [R, V]: repetition, frequency/presence, logit bias, allowed-token mask (in this order).

    Never modifies `logits`. Repetition divides positive logits of seen tokens and multiplies negative ones;
    frequency/presence subtract freq * count + presence * (count > 0) over output tokens.
    """
    x = logits.float()
    num_rows, vocab_size = x.shape
    p = penalties
    if p.repetition is not None and p.seen_flat_ids is not None:
        seen = torch.zeros(num_rows * vocab_size, dtype=torch.bool, device=x.device)
        seen = seen.index_fill_(0, p.seen_flat_ids, True).view(num_rows, vocab_size)
        rep = p.repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    if p.frequency is not None and p.presence is not None and p.output_flat_ids is not None:
        counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=x.device)
        ones = torch.ones(p.output_flat_ids.shape, dtype=torch.float32, device=x.device)
        counts = counts.scatter_add_(0, p.output_flat_ids, ones).view(num_rows, vocab_size)
        x = x - (p.frequency[:, None] * counts + p.presence[:, None] * (counts > 0))
    if p.bias_flat_ids is not None and p.bias_values is not None:
        x = x.reshape(-1).scatter_add(0, p.bias_flat_ids, p.bias_values).view(num_rows, vocab_size)
    if p.allowed_flat_ids is not None and p.unrestricted is not None:
        allowed = p.unrestricted[:, None].repeat(1, vocab_size).view(-1)
        allowed = allowed.index_fill_(0, p.allowed_flat_ids, True).view(num_rows, vocab_size)
        x = x.masked_fill(~allowed, -math.inf)
    return x


@dataclass(frozen=True)
class Filters:
    """Temperature and top-k / top-p / min-p of Q random (non-greedy) rows.

    Rows with top_p < 1 are sorted once (top-k applied inside the sort); rows with only top-k use topk.
    """

    temperature: torch.Tensor  # [Q] f32, >= MIN_TEMPERATURE
    sort_rows: torch.Tensor | None = None  # [S] i64 into the Q rows
    sort_top_k: torch.Tensor | None = None  # [S] i64, V where off
    sort_top_p: torch.Tensor | None = None  # [S] f32
    topk_rows: torch.Tensor | None = None  # [K] i64 into the Q rows
    topk_k: torch.Tensor | None = None  # [K] i64, in 1..max_top_k
    max_top_k: int = 0
    log_min_p: torch.Tensor | None = None  # [Q] f32, -inf where off

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int) -> Filters:
        temperature = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], dtype=torch.float32)
        fields_: dict[str, torch.Tensor | int] = {}
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        sort_rows = [r for r, p in enumerate(params) if p.top_p < 1.0]
        if sort_rows:
            fields_["sort_rows"] = torch.tensor(sort_rows, dtype=torch.int64)
            fields_["sort_top_k"] = torch.tensor([top_k[r] for r in sort_rows], dtype=torch.int64)
            fields_["sort_top_p"] = torch.tensor([params[r].top_p for r in sort_rows], dtype=torch.float32)
        topk_rows = [r for r, p in enumerate(params) if p.top_p >= 1.0 and top_k[r] < vocab_size]
        if topk_rows:
            fields_["topk_rows"] = torch.tensor(topk_rows, dtype=torch.int64)
            fields_["topk_k"] = torch.tensor([top_k[r] for r in topk_rows], dtype=torch.int64)
            fields_["max_top_k"] = max(top_k[r] for r in topk_rows)
        if any(p.min_p > 0.0 for p in params):
            log_min_p = [math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params]
            fields_["log_min_p"] = torch.tensor(log_min_p, dtype=torch.float32)
        return cls(temperature=temperature, **fields_)  # type: ignore[arg-type]


def _top_k_top_p_threshold(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[S] the smallest logit kept by top-k then top-p (renormalised after top-k), via one full sort."""
    sorted_x = x.sort(dim=-1, descending=True).values
    positions = torch.arange(x.shape[1], device=x.device)
    sorted_x = sorted_x.masked_fill(positions >= top_k[:, None], -math.inf)
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep the shortest prefix whose mass reaches top_p (at least one token, at most top_k).
    num_kept = (mass_before < top_p[:, None]).sum(dim=-1)
    num_kept = torch.minimum(num_kept.clamp_(min=1), top_k)
    return sorted_x.gather(1, (num_kept - 1)[:, None]).squeeze(1)


def apply_filters(x: torch.Tensor, filters: Filters) -> torch.Tensor:
    """float32 [Q, V]: x / T with tokens excluded by top-k, top-p or min-p set to -inf."""
    x = x / filters.temperature[:, None]
    f = filters
    threshold = torch.full((x.shape[0],), -math.inf, device=x.device)
    if f.sort_rows is not None and f.sort_top_k is not None and f.sort_top_p is not None:
        kept = _top_k_top_p_threshold(x.index_select(0, f.sort_rows), f.sort_top_k, f.sort_top_p)
        threshold = threshold.index_copy(0, f.sort_rows, kept)
    if f.topk_rows is not None and f.topk_k is not None:
        best = x.index_select(0, f.topk_rows).topk(f.max_top_k, dim=-1).values
        threshold = threshold.index_copy(0, f.topk_rows, best.gather(1, (f.topk_k - 1)[:, None]).squeeze(1))
    if f.log_min_p is not None:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); filtering above never removes the max.
        threshold = torch.maximum(threshold, x.amax(dim=-1) + f.log_min_p)
    return x.masked_fill(x < threshold[:, None], -math.inf)


@dataclass(frozen=True)
class _Plan:
    """Host-side row bookkeeping of one call. Local indices: random/logprob rows index the sampling rows."""

    num_rows: int
    sampling_rows: list[int]
    distribution_rows: list[int]
    random_rows: list[int]
    logprob_rows: list[int]
    num_logprobs: list[int]  # per logprob row
    distribution_top_ks: list[int]  # per distribution row
    seeded: list[tuple[int, int]]  # (random row, generator seed)

    @classmethod
    def build(cls, specs: Sequence[OutputSpec]) -> _Plan:
        sampling_rows = [i for i, s in enumerate(specs) if s.sampling is not None]
        params = [_params(specs[i]) for i in sampling_rows]
        random_rows = [r for r, p in enumerate(params) if not p.is_greedy]
        logprob_rows = [r for r, p in enumerate(params) if p.num_logprobs is not None]
        distribution_rows = [i for i, s in enumerate(specs) if s.distribution_top_k is not None]
        return cls(
            num_rows=len(specs),
            sampling_rows=sampling_rows,
            distribution_rows=distribution_rows,
            random_rows=random_rows,
            logprob_rows=logprob_rows,
            num_logprobs=[params[r].num_logprobs or 0 for r in logprob_rows],
            distribution_top_ks=[specs[i].distribution_top_k or 0 for i in distribution_rows],
            seeded=[
                (q, seed_key(p.seed, len(p.output_token_ids)))
                for q, p in enumerate(params[r] for r in random_rows)
                if p.seed is not None
            ],
        )

    @property
    def has_unseeded(self) -> bool:
        return len(self.seeded) < len(self.random_rows)


@dataclass(frozen=True)
class _RowIndex:
    """Row subsets as index tensors; None where the subset is the whole set (no copy needed)."""

    sampling: torch.Tensor | None
    distribution: torch.Tensor | None
    random: torch.Tensor | None
    logprob: torch.Tensor | None

    @classmethod
    def build(cls, plan: _Plan) -> _RowIndex:
        num_sampling = len(plan.sampling_rows)
        return cls(
            sampling=_subset(plan.sampling_rows, plan.num_rows),
            distribution=_subset(plan.distribution_rows, plan.num_rows),
            random=_subset(plan.random_rows, num_sampling),
            logprob=_subset(plan.logprob_rows, num_sampling),
        )


def _subset(rows: list[int], num_rows: int) -> torch.Tensor | None:
    return None if len(rows) == num_rows else torch.tensor(rows, dtype=torch.int64)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _params(spec: OutputSpec) -> SamplingParams:
    assert spec.sampling is not None
    return spec.sampling


def _is_plain_greedy(spec: OutputSpec) -> bool:
    """Argmax of the raw logits is the whole answer: no penalties, bias, mask or logprobs."""
    p = spec.sampling
    return (
        p is not None
        and p.is_greedy
        and p.num_logprobs is None
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and not p.logit_bias
        and p.allowed_token_ids is None
    )


def _check_inputs(logits: torch.Tensor, specs: Sequence[OutputSpec]) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point [N, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[0] != len(specs):
        raise ValueError(f"logits have {logits.shape[0]} rows but {len(specs)} output specs were given")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary")


class Sampler:
    """Samples one step's outputs. Unseeded rows draw from this sampler's generator (one per device)."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seeded_generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, specs: Sequence[OutputSpec]) -> list[OutputResult]:
        """One OutputResult per row of logits [N, V] (row i answers specs[i]); ValueError on bad input."""
        _check_inputs(logits, specs)
        if not specs:
            return []
        if all(_is_plain_greedy(s) for s in specs):
            return [OutputResult(token_id=t) for t in logits.argmax(dim=-1).tolist()]
        plan = _Plan.build(specs)
        vocab_size = logits.shape[1]
        params = [_params(specs[i]) for i in plan.sampling_rows]
        penalties = Penalties.build(params, vocab_size)
        filters = Filters.build([params[r] for r in plan.random_rows], vocab_size)
        rows, penalties, filters = ship([_RowIndex.build(plan), penalties, filters], logits.device)
        parts: list[torch.Tensor] = []
        if plan.sampling_rows:
            raw = _take(logits, rows.sampling)
            tokens = self._tokens(raw, penalties, filters, plan, rows)
            parts.append(tokens)
            if plan.logprob_rows:
                parts.extend(_logprobs(_take(raw, rows.logprob), _take(tokens, rows.logprob), plan))
        if plan.distribution_rows:
            parts.extend(_distributions(_take(logits, rows.distribution), max(plan.distribution_top_ks)))
        # The one device-to-host transfer: ids are exact in float64.
        values = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).tolist()
        return _unpack(values, plan, vocab_size)

    def _tokens(
        self, raw: torch.Tensor, penalties: Penalties, filters: Filters, plan: _Plan, rows: _RowIndex
    ) -> torch.Tensor:
        """[R] int64 tokens of the sampling rows: argmax for greedy rows, the exponential race otherwise."""
        x = raw.float() if penalties.is_empty else apply_penalties(raw, penalties)
        if not plan.random_rows:
            return x.argmax(dim=-1)
        filtered = apply_filters(_take(x, rows.random), filters)
        drawn = (filtered - self._exponential_noise(filtered, plan).log_()).argmax(dim=-1)
        if rows.random is None:
            return drawn
        return x.argmax(dim=-1).index_copy_(0, rows.random, drawn)

    def _exponential_noise(self, like: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Exp(1) noise [Q, V], > 0. Seeded rows get their own stream, so the batch never affects them."""
        noise = torch.empty_like(like)
        if plan.has_unseeded:
            noise.exponential_(generator=self._generator(like.device))
        if plan.seeded:
            generator = self._seeded_generators.setdefault(like.device, torch.Generator(device=like.device))
            for row, key in plan.seeded:
                generator.manual_seed(key)
                noise[row].exponential_(generator=generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    """[L] logprob of each token, then [L, n] top values and ids (n = the largest num_logprobs asked)."""
    logprobs = raw.float().log_softmax(dim=-1)
    parts = [logprobs.gather(1, tokens[:, None]).squeeze(1)]
    num_top = min(max(plan.num_logprobs), raw.shape[1])
    if num_top > 0:
        top = logprobs.topk(num_top, dim=-1)
        parts.extend([top.values, top.indices])
    return parts


def _distributions(raw: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """[D, k] probabilities and ids of the k most probable tokens of softmax(raw), descending."""
    top = raw.float().softmax(dim=-1).topk(min(top_k, raw.shape[1]), dim=-1)
    return [top.values, top.indices]


def _unpack(values: list[float], plan: _Plan, vocab_size: int) -> list[OutputResult]:
    """Reads the packed results back in the order _Sampler.sample wrote them."""
    cursor = 0

    def take(count: int) -> list[float]:
        nonlocal cursor
        cursor += count
        return values[cursor - count : cursor]

    results = [OutputResult() for _ in range(plan.num_rows)]
    tokens = [int(t) for t in take(len(plan.sampling_rows))]
    for r, i in enumerate(plan.sampling_rows):
        results[i] = OutputResult(token_id=tokens[r])
    if plan.logprob_rows:
        chosen = take(len(plan.logprob_rows))
        num_top = min(max(plan.num_logprobs), vocab_size)
        top_values, top_ids = take(len(chosen) * num_top), take(len(chosen) * num_top)
        for j, (r, n) in enumerate(zip(plan.logprob_rows, plan.num_logprobs)):
            top = tuple((int(top_ids[j * num_top + c]), top_values[j * num_top + c]) for c in range(min(n, num_top)))
            i = plan.sampling_rows[r]
            results[i] = replace(results[i], logprob=chosen[j], top_logprobs=top)
    if plan.distribution_rows:
        width = min(max(plan.distribution_top_ks), vocab_size)
        probs, ids = take(len(plan.distribution_rows) * width), take(len(plan.distribution_rows) * width)
        for d, (i, k) in enumerate(zip(plan.distribution_rows, plan.distribution_top_ks)):
            pairs = tuple((int(ids[d * width + c]), probs[d * width + c]) for c in range(min(k, width)))
            results[i] = OutputResult(distribution=pairs)
    return results

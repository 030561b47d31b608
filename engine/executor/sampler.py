"""Token sampling for one step: logits [N, V] and one OutputSpec per row -> one OutputResult per row.

Pipeline (vLLM's order), on the logits' device and vectorised over rows:

    raw --(x - logsumexp, topk)--> logprob, top_logprobs  (raw logprobs, vLLM's default)
    raw --(topk, exp(x - logsumexp))--> top-K distribution (distribution rows)
    raw --repetition--> frequency/presence --> logit_bias --> allowed-token mask   = processed
    processed --argmax--> greedy tokens
    exp(processed / T - max) --top-k--> top-p --> min-p --> inverse-CDF draw with one uniform per row

Penalties, bias and masks touch only the listed token ids (gather, compute, scatter back), never a dense
[R, V] pass. One uniform per row makes seeds cheap: a seeded row's uniform is a hash of (seed,
len(output_token_ids)), so its token depends only on its own logits and params, never on the batch;
unseeded rows take theirs from the sampler's generator. Host inputs travel with one copy per dtype, and
every result the host needs comes back packed in one float64 tensor (one device-to-host transfer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from itertools import chain
from typing import Sequence, TypeVar

import numpy as np
import torch

from engine.executor.batch import OutputResult, OutputSpec, SamplingParams

# Temperatures below this are clamped (x / T would overflow); such rows are argmax in all but name.
MIN_TEMPERATURE = 1e-5
# Top-p on CPU looks for its cut-off among the largest weights first (topk is ~20x cheaper than a full
# sort there); rows whose cut-off lies further out try the next size, then the full sort. CUDA sorts
# directly, since the "found it?" test would cost a device sync.
TOP_P_CANDIDATES = (256, 2048)
_MASK64 = (1 << 64) - 1
_T = TypeVar("_T")


def seed_key(seed: int, step: int) -> int:
    """A 64-bit hash of (seed, step) (splitmix64): the source of a seeded row's uniform at that step."""
    z = ((seed & _MASK64) ^ ((step + 1) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _flat_token_ids(
    rows_of_ids: Sequence[Sequence[int]], vocab_size: int, what: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Host (int64 tensor of r * V + t, numpy row r) for every token t of every row r (repeats kept).

    Built with numpy: at 256 rows of long histories, torch.tensor / repeat_interleave cost milliseconds.
    """
    lengths = np.fromiter((len(ids) for ids in rows_of_ids), dtype=np.int64, count=len(rows_of_ids))
    try:
        ids = np.fromiter(chain.from_iterable(rows_of_ids), dtype=np.int64, count=int(lengths.sum()))
    except OverflowError as error:
        raise ValueError(f"{what}: a token id is outside the vocabulary [0, {vocab_size})") from error
    rows = np.repeat(np.arange(len(rows_of_ids), dtype=np.int64), lengths)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(
            f"{what}: token id {int(ids[bad[0]])} (sampling row {int(rows[bad[0]])}) "
            f"is outside the vocabulary [0, {vocab_size})"
        )
    return torch.from_numpy(rows * vocab_size + ids), rows


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
    """Penalties, logit bias and allowed tokens of R sampling rows, as flat ids r * V + t.

    Per-id parameter tensors are aligned with their ids. A group is None when no row uses it.
    """

    seen_flat_ids: torch.Tensor | None = None  # prompt + output tokens of rows with repetition != 1
    seen_repetition: torch.Tensor | None = None  # f32
    output_flat_ids: torch.Tensor | None = None  # output tokens (repeats kept) of rows with freq/presence
    output_frequency: torch.Tensor | None = None  # f32
    output_presence: torch.Tensor | None = None  # f32
    bias_flat_ids: torch.Tensor | None = None  # unique
    bias_values: torch.Tensor | None = None  # f32
    allowed_flat_ids: torch.Tensor | None = None
    restricted_rows: torch.Tensor | None = None  # rows with an allowed-token list

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int) -> Penalties:
        """Host tensors for `params` (one per row); raises ValueError on out-of-vocabulary ids."""
        groups: dict[str, torch.Tensor] = {}
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = [p.prompt_token_ids + p.output_token_ids if p.repetition_penalty != 1.0 else () for p in params]
            ids, rows = _flat_token_ids(seen, vocab_size, "prompt/output token ids")
            groups["seen_flat_ids"] = ids
            groups["seen_repetition"] = _per_row([p.repetition_penalty for p in params], rows)
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            outputs = [p.output_token_ids if p.frequency_penalty or p.presence_penalty else () for p in params]
            ids, rows = _flat_token_ids(outputs, vocab_size, "output token ids")
            groups["output_flat_ids"] = ids
            groups["output_frequency"] = _per_row([p.frequency_penalty for p in params], rows)
            groups["output_presence"] = _per_row([p.presence_penalty for p in params], rows)
        if any(p.logit_bias for p in params):
            groups.update(_bias_tensors(params, vocab_size))
        if any(p.allowed_token_ids is not None for p in params):
            allowed = [p.allowed_token_ids or () for p in params]
            groups["allowed_flat_ids"] = _flat_token_ids(allowed, vocab_size, "allowed_token_ids")[0]
            restricted = [r for r, p in enumerate(params) if p.allowed_token_ids is not None]
            groups["restricted_rows"] = torch.tensor(restricted, dtype=torch.int64)
        return cls(**groups)

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def _per_row(values: list[float], rows: np.ndarray | None = None) -> torch.Tensor:
    """float32 tensor of one value per row, or per entry of `rows` (a row index per flat id)."""
    per_row = np.asarray(values, dtype=np.float32)
    return torch.from_numpy(per_row if rows is None else per_row[rows])


def _bias_tensors(params: Sequence[SamplingParams], vocab_size: int) -> dict[str, torch.Tensor]:
    """logit_bias as unique flat ids and values; a token listed twice in one row keeps its last bias."""
    biases = [dict(p.logit_bias) for p in params]
    values = list(chain.from_iterable(b.values() for b in biases))
    if any(math.isnan(v) or v == math.inf for v in values):
        raise ValueError("logit_bias values must be finite or -inf")
    return {
        "bias_flat_ids": _flat_token_ids([tuple(b) for b in biases], vocab_size, "logit_bias")[0],
        "bias_values": torch.tensor(values, dtype=torch.float32),
    }


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """A float32 copy of logits [R, V] with repetition, frequency/presence, logit bias and the
    allowed-token mask applied (in this order).

    Repetition divides positive logits of seen tokens by the penalty and multiplies the others;
    frequency/presence subtract freq * count + presence from tokens that occur in the output.
    Only the listed ids are touched: gather them, compute, scatter back (repeated ids write equal values).
    """
    x = logits.to(torch.float32, copy=True)
    flat = x.view(-1)
    p = penalties
    if p.seen_flat_ids is not None and p.seen_repetition is not None:
        values = flat.index_select(0, p.seen_flat_ids)
        rep = p.seen_repetition
        flat.index_copy_(0, p.seen_flat_ids, torch.where(values > 0, values / rep, values * rep))
    if p.output_flat_ids is not None and p.output_frequency is not None and p.output_presence is not None:
        ids = p.output_flat_ids
        # counts[i] = occurrences of ids[i] among ids (same row and token), without a dense [R, V] buffer.
        ordered = ids.sort().values
        counts = (torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)).float()
        values = flat.index_select(0, ids)
        flat.index_copy_(0, ids, values - (p.output_frequency * counts + p.output_presence))
    if p.bias_flat_ids is not None and p.bias_values is not None:
        flat.index_add_(0, p.bias_flat_ids, p.bias_values)
    if p.allowed_flat_ids is not None and p.restricted_rows is not None:
        values = flat.index_select(0, p.allowed_flat_ids)
        x.index_fill_(0, p.restricted_rows, -math.inf)
        flat.index_copy_(0, p.allowed_flat_ids, values)
    return x


@dataclass(frozen=True)
class Draws:
    """Temperature, top-k / top-p / min-p and the uniform of Q random (non-greedy) rows."""

    temperature: torch.Tensor  # [Q] f32, >= MIN_TEMPERATURE
    uniforms: torch.Tensor  # [Q] f32 in [0, 1 - 2^-20): where each row's draw falls in its CDF
    top_k_rows: torch.Tensor | None = None  # [K] i64 into the Q rows
    top_k: torch.Tensor | None = None  # [K] i64, in 1..max_top_k
    max_top_k: int = 0
    top_p_rows: torch.Tensor | None = None  # [P] i64 into the Q rows
    top_p: torch.Tensor | None = None  # [P] f32
    min_p: torch.Tensor | None = None  # [Q] f32, 0 where off

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int, generator: torch.Generator) -> Draws:
        """Host tensors; seeded rows take their uniform from (seed, step), the others from `generator`."""
        groups: dict[str, torch.Tensor | int] = {}
        top_k_rows = [r for r, p in enumerate(params) if 0 < p.top_k < vocab_size]
        if top_k_rows:
            groups["top_k_rows"] = torch.tensor(top_k_rows, dtype=torch.int64)
            groups["top_k"] = torch.tensor([params[r].top_k for r in top_k_rows], dtype=torch.int64)
            groups["max_top_k"] = max(params[r].top_k for r in top_k_rows)
        top_p_rows = [r for r, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            groups["top_p_rows"] = torch.tensor(top_p_rows, dtype=torch.int64)
            groups["top_p"] = _per_row([params[r].top_p for r in top_p_rows])
        if any(p.min_p > 0.0 for p in params):
            groups["min_p"] = _per_row([p.min_p for p in params])
        temperature = _per_row([max(p.temperature, MIN_TEMPERATURE) for p in params])
        return cls(temperature=temperature, uniforms=_uniforms(params, generator), **groups)  # type: ignore[arg-type]

    @property
    def has_filters(self) -> bool:
        return self.top_k_rows is not None or self.top_p_rows is not None or self.min_p is not None


def _uniforms(params: Sequence[SamplingParams], generator: torch.Generator) -> torch.Tensor:
    """[Q] f32 uniforms, scaled by (1 - 2^-20) so that u * total stays below the CDF's last value."""
    drawn = torch.rand(len(params), generator=generator, dtype=torch.float64).tolist()
    uniforms = [
        drawn[r] if p.seed is None else (seed_key(p.seed, len(p.output_token_ids)) >> 11) * 2.0**-53
        for r, p in enumerate(params)
    ]
    return torch.tensor(uniforms, dtype=torch.float64).mul_(1.0 - 2.0**-20).float()


def filtered_weights(x: torch.Tensor, draws: Draws) -> torch.Tensor:
    """float32 [Q, V]: softmax(x / T), zero where top-k, then top-p, then min-p exclude the token.

    Not renormalised after filtering (the draw scales by the row's total). Cut-offs are values, so tokens
    tied with the last kept one stay. Top-p keeps the shortest prefix (by probability, after top-k) whose
    mass reaches top_p. Masks are float 0/1 products: on CPU torch.where / masked_fill cost ~30x a multiply.
    """
    weights = torch.div(x, draws.temperature[:, None]).softmax(dim=-1)
    if not draws.has_filters:
        return weights
    d = draws
    threshold = torch.zeros(weights.shape[0], device=x.device)
    if d.top_k_rows is not None and d.top_k is not None:
        best = _rows_of(weights, d.top_k_rows).topk(d.max_top_k, dim=-1).values
        threshold.index_copy_(0, d.top_k_rows, best.gather(1, d.top_k[:, None] - 1)[:, 0])
    if d.top_p_rows is not None and d.top_p is not None:
        top_k_cut = threshold.index_select(0, d.top_p_rows)
        candidates = _rows_of(weights, d.top_p_rows)  # may alias weights: zeroing below top-k is harmless
        if d.top_k_rows is not None:
            candidates = _keep_at_least(candidates, top_k_cut)
        top_p_cut = _top_p_threshold(candidates, d.top_p)
        threshold.index_copy_(0, d.top_p_rows, torch.maximum(top_k_cut, top_p_cut))
    if d.min_p is not None:
        # p_i >= min_p * p_max; the filters above never remove the most probable token.
        threshold = torch.maximum(threshold, d.min_p * weights.amax(dim=-1))
    return _keep_at_least(weights, threshold)


def _rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows], without a copy when rows lists every row (in order, as the builders make them)."""
    return x if rows.numel() == x.shape[0] else x.index_select(0, rows)


def _keep_at_least(weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """weights (modified in place) with entries below their row's threshold [Q] set to 0."""
    return weights.mul_(torch.ge(weights, threshold[:, None], out=torch.empty_like(weights)))


def _top_p_threshold(weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[P] the smallest weight top-p keeps in each row of weights [P, V] (>= 0, unnormalised)."""
    vocab_size = weights.shape[1]
    target = top_p * weights.sum(dim=-1)
    if weights.is_cuda:
        return _prefix_threshold(weights.sort(dim=-1, descending=True).values, target)[0]
    thresholds = torch.zeros_like(top_p)
    rows: torch.Tensor | None = None  # the rows still looking; None = all
    for num_candidates in (*[c for c in TOP_P_CANDIDATES if c < vocab_size], vocab_size):
        candidates = _take(weights, rows).topk(num_candidates, dim=-1).values  # == a full sort at V
        found, complete = _prefix_threshold(candidates, _take(target, rows))
        thresholds = found if rows is None else thresholds.index_copy_(0, rows, found)
        if bool(complete.all()):
            break
        rows = (~complete).nonzero()[:, 0] if rows is None else rows[~complete]
    return thresholds


def _prefix_threshold(descending: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut-off weight of the shortest prefix whose mass reaches target, and whether it ended in the prefix.

    Entry j is kept iff the mass before it, cdf[j - 1], is below target: 1 + (#cdf entries < target).
    """
    num_candidates = descending.shape[1]
    cdf = descending.cumsum(dim=-1)
    num_kept = torch.searchsorted(cdf, target[:, None])[:, 0].add_(1).clamp_(max=num_candidates)
    return descending.gather(1, num_kept[:, None] - 1)[:, 0], num_kept < num_candidates


def draw_tokens(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[Q] int64 inverse-CDF draws (weights is consumed: it becomes the CDF in place).

    Token i comes with probability weights[i] / sum. uniforms < 1 - 2^-20 keep u * total below the CDF's
    last value, so the first CDF entry above it exists and belongs to a token of positive weight. A row
    with no finite logit (NaN weights) still gets a valid, arbitrary id from the clamp.
    """
    cdf = weights.cumsum_(dim=-1)
    drawn = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True)[:, 0]
    return drawn.clamp_(max=weights.shape[1] - 1)


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
        )


@dataclass(frozen=True)
class _RowIndex:
    """Row subsets as index tensors; None where the subset is the whole set (no copy needed)."""

    sampling: torch.Tensor | None  # into the N rows
    distribution: torch.Tensor | None  # into the N rows
    random: torch.Tensor | None  # into the sampling rows
    greedy: torch.Tensor | None  # into the sampling rows
    logprob: torch.Tensor | None  # into the sampling rows

    @classmethod
    def build(cls, plan: _Plan) -> _RowIndex:
        num_sampling = len(plan.sampling_rows)
        return cls(
            sampling=_subset(plan.sampling_rows, plan.num_rows),
            distribution=_subset(plan.distribution_rows, plan.num_rows),
            random=_subset(plan.random_rows, num_sampling),
            greedy=_subset(sorted(set(range(num_sampling)) - set(plan.random_rows)), num_sampling),
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
    """Samples one step's outputs. Unseeded rows draw their uniforms from this sampler's (CPU) generator."""

    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

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
        draws = Draws.build([params[r] for r in plan.random_rows], vocab_size, self._generator)
        rows, penalties, draws = ship([_RowIndex.build(plan), penalties, draws], logits.device)
        parts: list[torch.Tensor] = []
        if plan.sampling_rows:
            raw = _take(logits, rows.sampling)
            tokens = _tokens(raw, penalties, draws, plan, rows)
            parts.append(tokens)
            if plan.logprob_rows:
                parts.extend(_logprobs(_take(raw, rows.logprob), _take(tokens, rows.logprob), plan))
        if plan.distribution_rows:
            parts.extend(_distributions(_take(logits, rows.distribution), max(plan.distribution_top_ks)))
        # The one device-to-host transfer: ids are exact in float64.
        values = torch.cat([p.reshape(-1).to(torch.float64) for p in parts]).tolist()
        return _unpack(values, plan, vocab_size)


def _tokens(raw: torch.Tensor, penalties: Penalties, draws: Draws, plan: _Plan, rows: _RowIndex) -> torch.Tensor:
    """[R] int64 tokens of the sampling rows: argmax for greedy rows, an inverse-CDF draw for the others."""
    x = raw.float() if penalties.is_empty else apply_penalties(raw, penalties)
    if not plan.random_rows:
        return x.argmax(dim=-1)
    drawn = draw_tokens(filtered_weights(_take(x, rows.random), draws), draws.uniforms)
    if rows.random is None:
        return drawn
    tokens = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    tokens.index_copy_(0, rows.random, drawn)
    return tokens.index_copy_(0, rows.greedy, _take(x, rows.greedy).argmax(dim=-1))


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    """[L] logprob of each token, then [L, n] top logprobs and ids (n = the largest num_logprobs asked)."""
    x = raw.float()
    log_total = x.logsumexp(dim=-1)
    parts = [x.gather(1, tokens[:, None])[:, 0] - log_total]
    num_top = min(max(plan.num_logprobs), x.shape[1])
    if num_top > 0:
        top = x.topk(num_top, dim=-1)
        parts.extend([top.values - log_total[:, None], top.indices])
    return parts


def _distributions(raw: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """[D, k] probabilities and ids of the k most probable tokens of softmax(raw), descending."""
    x = raw.float()
    top = x.topk(min(top_k, x.shape[1]), dim=-1)
    return [(top.values - x.logsumexp(dim=-1, keepdim=True)).exp_(), top.indices]


def _unpack(values: list[float], plan: _Plan, vocab_size: int) -> list[OutputResult]:
    """Reads the packed results back in the order Sampler.sample wrote them."""
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

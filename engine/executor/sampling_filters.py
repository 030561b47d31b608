"""Temperature, top-k, top-p and min-p as weights over the vocabulary, and the inverse-CDF draw with one
uniform per row (seeded rows hash (seed, step) into their uniform)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pie_server.engine.step import SamplingParams
from pie_server.engine.executor.sampling_penalties import per_row

# Temperatures below this are clamped (x / T would overflow); such rows are argmax in all but name.
MIN_TEMPERATURE = 1e-5
# Top-p on CPU looks for its cut-off among the largest weights first (topk is ~20x cheaper than a full
# sort there); rows whose cut-off lies further out try the next size, then the full sort. CUDA sorts
# directly, since the "found it?" test would cost a device sync.
TOP_P_CANDIDATES = (256, 2048)
_MASK64 = (1 << 64) - 1


# argmax_rows splits rows of at least this many columns into chunks of up to this many (a power of two
# dividing the row): torch's argmax reduces a row in one thread block, 28 us for a 128K vocabulary on an H100.
ARGMAX_CHUNK = 2048


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [N, V] (the first index among equal maxima, as torch's), on CUDA in two stages:
    each row's maxima of chunks of C columns, then the first chunk holding the row's maximum."""
    num_cols = x.shape[-1]
    chunk = min(ARGMAX_CHUNK, num_cols & -num_cols)  # the largest power of two dividing V, at most the cap
    if x.device.type != "cuda" or num_cols < ARGMAX_CHUNK or chunk < 64:
        return x.argmax(dim=-1)
    return _chunked_argmax(x, chunk)


def _chunked_argmax(x: torch.Tensor, chunk: int) -> torch.Tensor:
    maxima, where = x.reshape(x.shape[0], -1, chunk).max(dim=-1)  # [N, V / C] each (first index of the max)
    best_chunk = maxima.argmax(dim=-1, keepdim=True)  # [N, 1]: the first chunk reaching the row's maximum
    return (best_chunk * chunk + where.gather(1, best_chunk)).squeeze(1)


def seed_key(seed: int, step: int) -> int:
    """A 64-bit hash of (seed, step) (splitmix64): the source of a seeded row's uniform at that step."""
    z = ((seed & _MASK64) ^ ((step + 1) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


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
            groups["top_p"] = per_row([params[r].top_p for r in top_p_rows])
        if any(p.min_p > 0.0 for p in params):
            groups["min_p"] = per_row([p.min_p for p in params])
        temperature = per_row([max(p.temperature, MIN_TEMPERATURE) for p in params])
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
        candidates = take_rows(weights, rows).topk(num_candidates, dim=-1).values  # == a full sort at V
        found, complete = _prefix_threshold(candidates, take_rows(target, rows))
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


def take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)

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

launch() never waits for the device: it returns SampledOutputs, whose `tokens` stay on the device (a later
step can consume them there, see batch.TokenRef) and whose results() waits for the one transfer.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import msgspec
import torch

from pie_server.engine.step import OutputResult, OutputSpec, SamplingParams
from pie_server.engine.executor.sampling_filters import Draws, argmax_rows, draw_tokens, filtered_weights, take_rows
from pie_server.engine.executor.sampling_penalties import Penalties, apply_penalties, byte_bias_on, ship


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


def _params(spec: OutputSpec) -> SamplingParams:
    assert spec.sampling is not None
    return spec.sampling


def _check_inputs(logits: torch.Tensor, specs: Sequence[OutputSpec]) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point [N, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if logits.shape[0] != len(specs):
        raise ValueError(f"logits have {logits.shape[0]} rows but {len(specs)} output specs were given")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary")


class SampledOutputs:
    """One step's sampled outputs, possibly still being computed on the device.

    tokens: [N] int64 on the logits' device, row i's sampled token (-1 for distribution rows).
    results() waits for the packed device-to-host copy (pinned memory, enqueued by launch) and decodes it.
    """

    def __init__(self, tokens: torch.Tensor, packed: torch.Tensor,
                 decode: Callable[[list], list[OutputResult]], unsampled_rows: frozenset[int] = frozenset()) -> None:
        self.tokens = tokens
        self.unsampled_rows = unsampled_rows  # rows that sampled no token (distributions): -1 in tokens
        self._decode = decode
        self._event: torch.cuda.Event | None = None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            packed = host
        else:  # the values as of now, as the device's copy takes them: packed may be a buffer the next step rewrites
            packed = packed.clone()
        self._packed = packed
        self._results: list[OutputResult] | None = None

    def is_ready(self) -> bool:
        return self._event is None or self._event.query()

    def results(self) -> list[OutputResult]:
        if self._results is None:
            if self._event is not None:
                self._event.synchronize()
            self._results = self._decode(self._packed.tolist())
        return self._results


@functools.lru_cache(maxsize=1 << 16)
def greedy_result(token_id: int) -> OutputResult:
    """The result of a plain greedy row: immutable, so one object per token id serves every step (building 64 a
    step cost 41 us on the 2-core CPU, taking them from here 3 us; the cache holds at most ~10 MB)."""
    return OutputResult(token_id=token_id)


_PLAIN_GREEDY = operator.attrgetter("sampling.is_plain_greedy")


def all_plain_greedy(specs: Sequence[OutputSpec]) -> bool:
    """Whether every row's answer is the argmax of its raw logits (SamplingParams.is_plain_greedy); read at C
    speed, every decode step asks it of every row."""
    try:
        return all(map(_PLAIN_GREEDY, specs))
    except AttributeError:  # a distribution row: no sampling
        return False


def greedy_outputs(tokens: torch.Tensor) -> SampledOutputs:
    """The outputs of plain greedy rows whose argmax is tokens [N] int64 (computed already, on any device)."""
    return SampledOutputs(tokens, tokens, _greedy_results)


def _greedy_results(token_ids: list) -> list[OutputResult]:
    return list(map(greedy_result, token_ids))


class Sampler:
    """Samples one step's outputs. Unseeded rows draw their uniforms from this sampler's (CPU) generator."""

    def __init__(self, seed: int | None = None) -> None:
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._byte_bias: torch.Tensor | None = None  # BYTE_BIAS on the logits' device, for grammar masks

    def _byte_bias_on(self, device: torch.device) -> torch.Tensor:
        if self._byte_bias is None or self._byte_bias.device != device:
            self._byte_bias = byte_bias_on(device)
        return self._byte_bias

    def sample(self, logits: torch.Tensor, specs: Sequence[OutputSpec]) -> list[OutputResult]:
        """One OutputResult per row of logits [N, V] (row i answers specs[i]); ValueError on bad input."""
        return self.launch(logits, specs).results()

    def launch(self, logits: torch.Tensor, specs: Sequence[OutputSpec]) -> SampledOutputs:
        """Enqueues sampling of logits [N, V] (row i answers specs[i]); ValueError on bad input."""
        _check_inputs(logits, specs)
        if all_plain_greedy(specs):  # (also the empty batch)
            return greedy_outputs(argmax_rows(logits))
        plan = _Plan.build(specs)
        vocab_size = logits.shape[1]
        params = [_params(specs[i]) for i in plan.sampling_rows]
        penalties = Penalties.build(params, vocab_size, pin=logits.device.type == "cuda")
        draws = Draws.build([params[r] for r in plan.random_rows], vocab_size, self._generator)
        rows, penalties, draws = ship([_RowIndex.build(plan), penalties, draws], logits.device)
        if penalties.allowed_masks is not None:
            penalties = replace(penalties, mask_byte_bias=self._byte_bias_on(logits.device))
        parts: list[torch.Tensor] = []
        tokens = None
        if plan.sampling_rows:
            raw = take_rows(logits, rows.sampling)
            tokens = _tokens(raw, penalties, draws, plan, rows)
            parts.append(tokens)
            if plan.logprob_rows:
                parts.extend(_logprobs(take_rows(raw, rows.logprob), take_rows(tokens, rows.logprob), plan))
        if plan.distribution_rows:
            parts.extend(_distributions(take_rows(logits, rows.distribution), max(plan.distribution_top_ks)))
        # The one device-to-host transfer: ids are exact in float64.
        packed = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        all_tokens = _tokens_in_rows(tokens, rows.sampling, plan.num_rows, logits.device)
        return SampledOutputs(all_tokens, packed, lambda values: _unpack(values, plan, vocab_size),
                              frozenset(range(plan.num_rows)).difference(plan.sampling_rows))


def _tokens_in_rows(tokens: torch.Tensor | None, sampling_rows: torch.Tensor | None, num_rows: int,
                    device: torch.device) -> torch.Tensor:
    """[N] int64: the sampling rows' tokens in their rows, -1 in distribution rows (sampling_rows None: every
    row samples, so tokens is already that)."""
    if sampling_rows is None:
        assert tokens is not None
        return tokens
    all_tokens = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    return all_tokens if tokens is None else all_tokens.index_copy_(0, sampling_rows, tokens)


def _tokens(raw: torch.Tensor, penalties: Penalties, draws: Draws, plan: _Plan, rows: _RowIndex) -> torch.Tensor:
    """[R] int64 tokens of the sampling rows: argmax for greedy rows, an inverse-CDF draw for the others."""
    x = raw.float() if penalties.is_empty else apply_penalties(raw, penalties)
    if not plan.random_rows:
        return argmax_rows(x)
    drawn = draw_tokens(filtered_weights(take_rows(x, rows.random), draws), draws.uniforms)
    if rows.random is None:
        return drawn
    tokens = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    tokens.index_copy_(0, rows.random, drawn)
    return tokens.index_copy_(0, rows.greedy, argmax_rows(take_rows(x, rows.greedy)))


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
    """[L] logprob of each token, then [L, n] top logprobs and ids (n = the largest num_logprobs asked)."""
    x = raw.float()
    log_total = x.logsumexp(dim=-1)
    parts = [x.gather(1, tokens[:, None])[:, 0] - log_total]
    num_top = min(max(plan.num_logprobs), x.shape[1])
    if num_top > 0:
        values, ids = _top(x, num_top)
        parts.extend([values - log_total[:, None], ids])
    return parts


def _top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k) in the order (value descending, then token id ascending): equal values (frequent in bf16
    logits) come in the order argmax breaks ties in, so a greedy token is its row's first top entry."""
    top = x.topk(k, dim=-1)
    by_id = top.indices.argsort(dim=-1)
    values, ids = top.values.gather(1, by_id), top.indices.gather(1, by_id)
    by_value = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, by_value), ids.gather(1, by_value)


def _distributions(raw: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """[D, k] probabilities and ids of the k most probable tokens of softmax(raw), descending."""
    x = raw.float()
    values, ids = _top(x, min(top_k, x.shape[1]))
    return [(values - x.logsumexp(dim=-1, keepdim=True)).exp_(), ids]


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
            results[i] = msgspec.structs.replace(results[i], logprob=chosen[j], top_logprobs=top)
    if plan.distribution_rows:
        width = min(max(plan.distribution_top_ks), vocab_size)
        probs, ids = take(len(plan.distribution_rows) * width), take(len(plan.distribution_rows) * width)
        for d, (i, k) in enumerate(zip(plan.distribution_rows, plan.distribution_top_ks)):
            pairs = tuple((int(ids[d * width + c]), probs[d * width + c]) for c in range(min(k, width)))
            results[i] = OutputResult(distribution=pairs)
    return results

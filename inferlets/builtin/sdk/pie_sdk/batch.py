"""Steps of several contexts in one host call: their forward passes (or generations) join one engine batch.

Beams, forks and best-of-n samples would otherwise pay one host call per context per step. Each function
here makes one call for the whole set (plus one page allocation when some context needs pages), and takes
the per-context results apart. A context whose pass the host refused is left as it was; the others are
updated; then PieError names the failed ones. The server takes at most 64 contexts per call (its
max_generate_batch setting).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

from componentize_py_types import Ok
from wit_world.imports import forward, generate, kv

from .constraints import Constraint
from .context import GREEDY, Context
from .errors import PieError, call
from .eviction import MAX_EVICTIONS, rest_after_eviction, too_many_evictions
from .generation import Generation, joined
from .sampling import Sampler
from .stop import StopCondition


def generate_all(contexts: Sequence[Context], max_tokens: int = 256, *, sampler: Sampler = GREEDY,
                 stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 constraint: Constraint | None = None,
                 stream_channels: Sequence[int] | None = None) -> list[Generation]:
    """Generate for several contexts (e.g. forks) in lockstep: their steps share the engine's batches.
    stream_channels: one client channel per context, or None to stream nothing. With a seeded sampler,
    context i samples with seed + i: forks differ, and the whole call is reproducible."""
    if stream_channels is not None and len(stream_channels) != len(contexts):
        raise ValueError("give one stream channel per context")
    condition = StopCondition.of(max_tokens, stop, stop_token_ids, ignore_eos)
    conditions = {i: condition for i in range(len(contexts))}  # the contexts (still) to generate for
    generations: dict[int, Generation] = {}
    over: set[int] = set()  # contexts whose generation starts over (a grammar's, cut by an eviction)
    for _ in range(MAX_EVICTIONS):
        for i, gen in _generate_some(contexts, conditions, sampler, constraint, stream_channels).items():
            generations[i] = joined(generations[i], gen) if i in generations and i not in over else gen
        # A context whose KV the server evicted goes on (computed again) with the tokens it has left.
        afters = {i: rest_after_eviction(generations[i], conditions[i], constraint, stream_channels is not None)
                  for i in conditions}
        conditions = {i: after[0] for i, after in afters.items() if after is not None}
        over = {i for i, after in afters.items() if after is not None and after[1]}
        for i in over:
            contexts[i].forget_last(len(generations[i].token_ids))
        if not conditions:
            return [generations[i] for i in range(len(contexts))]
    raise too_many_evictions()


def _generate_some(contexts: Sequence[Context], conditions: dict[int, StopCondition], sampler: Sampler,
                   constraint: Constraint | None, stream_channels: Sequence[int] | None) -> dict[int, Generation]:
    """One generate-all call for the contexts conditions names (by index); their generations, absorbed."""
    indices = list(conditions)
    requests = [contexts[i].generate_request(conditions[i], nth_seed(sampler, i), constraint,
                                             False if stream_channels is None else stream_channels[i])
                for i in indices]
    results = generate.generate_all(requests)
    generations: dict[int, Generation] = {}
    errors: list[str] = []
    for i, result in zip(indices, results):
        if isinstance(result, Ok):
            generations[i] = contexts[i].absorb(result.value)
        else:
            errors.append(f"context {i}: {result.value}")
    if errors:
        raise PieError("generate_all failed for " + "; ".join(errors))
    return generations


def decode_step_all(contexts: Sequence[Context], sampler: Sampler = GREEDY) -> list[int]:
    """decode_step for every context in one host call; returns each one's sampled token (now pending).
    With a seeded sampler, context i samples with seed + i."""
    outputs = [ctx.sample_request(nth_seed(sampler, i)) for i, ctx in enumerate(contexts)]
    return _forward_all(contexts, outputs, Context.take_sample)


def next_distribution_all(contexts: Sequence[Context], k: int = 10) -> list[list[tuple[int, float]]]:
    """next_distribution(k) for every context in one host call; one [(token_id, prob)] list per context."""
    outputs = [ctx.distribution_request(k) for ctx in contexts]
    return _forward_all(contexts, outputs, Context.take_distribution)


def nth_seed(sampler: Sampler, i: int) -> Sampler:
    return sampler if sampler.seed is None else replace(sampler, seed=(sampler.seed + i) % 2 ** 64)


def _forward_all(contexts: Sequence[Context], outputs: list[forward.OutputRequest],
                 take: Callable[[Context, forward.Output], Any]) -> list[Any]:
    """One pass per context over its pending tokens with its one output, all in one forward-all call;
    take(ctx, output) applies each successful output to its context."""
    if len({id(ctx) for ctx in contexts}) != len(contexts):
        raise ValueError("a context appears twice")
    for ctx in contexts:
        ctx.check_room(len(ctx.pending_ids))
    missing = [ctx.num_missing_pages(len(ctx.pending_ids)) for ctx in contexts]
    new_page_ids = call(kv.allocate_pages, sum(missing)) if sum(missing) else []
    given: list[list[int]] = []
    for ctx, num_pages in zip(contexts, missing):
        start = sum(len(g) for g in given)
        given.append(new_page_ids[start:start + num_pages])
        ctx.page_ids.extend(given[-1])
    requests = [ctx.forward_request(ctx.pending_ids, [output]) for ctx, output in zip(contexts, outputs)]
    try:
        results = forward.forward_all(requests)
    except BaseException:
        for ctx, page_ids in zip(contexts, given):
            ctx.drop_pages(page_ids)
        raise
    values: list[Any] = []
    errors: list[str] = []
    for i, (ctx, page_ids, result) in enumerate(zip(contexts, given, results)):
        if isinstance(result, Ok):
            ctx.advance(len(ctx.pending_ids))
            values.append(take(ctx, result.value[0]))
        else:
            ctx.drop_pages(page_ids)
            errors.append(f"context {i}: {result.value}")
    if errors:
        raise PieError("the forward pass failed for " + "; ".join(errors))
    return values

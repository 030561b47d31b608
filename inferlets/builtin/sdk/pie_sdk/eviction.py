"""Going on after the server evicted the instance's KV (the last resort of preemption, docs/sdk.md): the
generation it cut continues with the tokens it has left, after Context.lose_kv made every token pending."""
from __future__ import annotations

import dataclasses

from .constraints import Constraint, JsonSchema, Regex
from .errors import KV_EVICTED, PieError
from .generation import Generation
from .stop import FINISH_EVICTED, StopCondition

# Evictions of one call in a row before it gives up. The victim is the newest instance, so the older ones finish
# and free their pages: a victim evicted again and again waits for them (16 was seen to be too few: 8 runs on a
# 12-page pool). The bound is only a guard against a host that evicts forever.
MAX_EVICTIONS = 1000


def rest_after_eviction(gen: Generation, condition: StopCondition, constraint: Constraint | None,
                        streamed: bool) -> tuple[StopCondition, bool] | None:
    """What follows a generation that an eviction cut short: (the condition of the next call, whether it starts
    over), or None if gen is whole. A grammar's state cannot be resumed where it was cut: a generation under one
    starts over (its cut tokens dropped by the caller), unless its text was streamed already (then it fails).
    Limits: a stop string across the cut is not seen, and a seeded sampler starts its stream again."""
    if gen.finish_reason != FINISH_EVICTED:
        return None
    if isinstance(constraint, (JsonSchema, Regex)):
        if streamed:
            raise PieError(f"{KV_EVICTED} in a streamed grammar-constrained generation, which cannot go on")
        return condition, True
    # (a generation is cut while it waits for pages, so it has tokens left: max_tokens stays >= 1)
    return dataclasses.replace(condition, max_tokens=max(1, condition.max_tokens - len(gen.token_ids))), False


def too_many_evictions() -> PieError:
    return PieError(f"{KV_EVICTED} {MAX_EVICTIONS} times in a row: the server is short of KV pages")

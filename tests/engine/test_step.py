"""The step contract's own logic (engine/step.py)."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from pie_server.engine.step import SamplingParams


@pytest.mark.parametrize("changes", [
    {"temperature": 0.7}, {"num_logprobs": 0}, {"presence_penalty": 0.5}, {"frequency_penalty": -0.5},
    {"repetition_penalty": 1.1}, {"logit_bias": ((3, 1.0),)}, {"allowed_token_ids": (1, 2)},
    {"allowed_token_mask": b"\x01"},
])
def test_only_bare_greedy_params_are_plain_greedy(changes: dict) -> None:
    assert SamplingParams().is_plain_greedy and SamplingParams(top_k=5, seed=1).is_plain_greedy
    assert not SamplingParams(**changes).is_plain_greedy


def test_the_cached_answer_stays_outside_the_fields() -> None:
    params = SamplingParams()
    assert params.is_plain_greedy
    changed = dataclasses.replace(params, temperature=1.0)  # a new object: its own answer
    assert not changed.is_plain_greedy
    assert params == SamplingParams() and hash(params) == hash(SamplingParams())
    assert pickle.loads(pickle.dumps(params)) == params


def test_with_allowed_mask_equals_a_checked_replace_and_forgets_the_cached_greediness() -> None:
    """The grammar decode's unchecked copy (SamplingParams.with_allowed_mask) is the same value as
    dataclasses.replace's, and its is_plain_greedy is its own (a masked row is not plain greedy)."""
    base = SamplingParams(temperature=0.0, seed=3, num_logprobs=None)
    assert base.is_plain_greedy  # cached in the base's __dict__ now
    mask = bytes([0b101, 0, 1])
    masked = base.with_allowed_mask(mask)
    assert masked == dataclasses.replace(base, allowed_token_mask=mask)
    assert not masked.is_plain_greedy and base.is_plain_greedy
    assert masked.with_allowed_mask(b"\x01").allowed_token_mask == b"\x01" and masked.allowed_token_mask == mask

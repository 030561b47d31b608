"""The emulated device (PIE_EMULATED_DEVICE_MS): steps one at a time for their time each, tokens drawn among those
an output may take, fed tokens checked, and a server that serves on it."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.executor.emulated import EmulatedExecutor
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef

VOCAB = 1000
EOS = 7


def _executor(step_s: float = 0.0, submit_s: float = 0.0) -> EmulatedExecutor:
    model = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    return EmulatedExecutor(model, EngineConfig(device="cpu", num_pages=64, page_size=16), step_s, [EOS],
                            submit_s=submit_s)


def _command(sampling: SamplingParams = SamplingParams(), fed: TokenRef | None = None) -> ForwardCommand:
    return ForwardCommand(token_ids=[1], positions=[0], page_ids=[0], last_page_len=1,
                          outputs=(OutputSpec(0, sampling),), fed_token=fed)


def _mask(allowed: list[int]) -> bytes:
    bits = np.zeros(VOCAB, np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def test_steps_take_their_time_one_after_another() -> None:
    executor = _executor(step_s=0.05)
    started = time.monotonic()
    first, second = executor.submit(Batch(forwards=[_command()])), executor.submit(Batch(forwards=[_command()]))
    assert time.monotonic() - started < 0.04  # submitting does not wait for the device
    first.result()
    assert 0.045 <= time.monotonic() - started < 0.09
    second.result()
    assert time.monotonic() - started >= 0.095  # the second step ran after the first, not beside it


def test_submit_does_its_host_work_before_the_step_starts() -> None:
    """PIE_EMULATED_SUBMIT_MS: each submit spins (host work) before its step takes the device, so host work and
    device time add up when the host does not run ahead."""
    executor = _executor(step_s=0.02, submit_s=0.03)
    started = time.monotonic()
    pending = executor.submit(Batch(forwards=[_command()]))
    assert time.monotonic() - started >= 0.03
    pending.result()
    assert time.monotonic() - started >= 0.05
    with pytest.raises(ValueError):
        _executor(submit_s=-0.001)


def test_tokens_are_drawn_among_the_allowed_ones() -> None:
    executor = _executor()
    allowed = [3, 8, 9, 500, 999]
    masked = SamplingParams(allowed_token_mask=_mask(allowed))
    listed = SamplingParams(allowed_token_ids=(11, 12))
    seen_masked, seen_listed, seen_plain = set(), set(), set()
    for _ in range(200):
        result = executor.execute(Batch(forwards=[_command(masked), _command(listed), _command()]))
        (masked_out,), (listed_out,), (plain_out,) = (r.outputs for r in result.results)
        seen_masked.add(masked_out.token_id)
        seen_listed.add(listed_out.token_id)
        seen_plain.add(plain_out.token_id)
    assert seen_masked == set(allowed)  # every allowed token comes up, nothing else
    assert seen_listed == {11, 12}
    assert EOS not in seen_plain and len(seen_plain) > 100 and max(seen_plain) < VOCAB


def test_a_fed_token_must_name_an_output_of_the_step_before() -> None:
    executor = _executor()
    executor.submit(Batch(forwards=[_command()]))
    executor.submit(Batch(forwards=[_command(fed=TokenRef(0))])).result()
    with pytest.raises(ValueError, match="previous step"):
        executor.submit(Batch(forwards=[_command(fed=TokenRef(1))]))

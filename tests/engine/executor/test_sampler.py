"""The sampler: greedy, filters, seeds, penalties, masks, logprobs and distributions on hand-made logits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pie_server.engine.step import OutputResult, OutputSpec, SamplingParams
from pie_server.engine.executor.sampler import Sampler
from pie_server.engine.executor.sampling_filters import Draws, _chunked_argmax, argmax_rows, filtered_weights
from pie_server.engine.executor.sampling_penalties import Penalties, apply_penalties, ship

# Hand-made distribution with known top-k / top-p / min-p sets; tokens are scattered over the vocabulary
# by a fixed permutation so that no rule can pass by favouring small ids.
PROBS = [0.40, 0.30, 0.15, 0.08, 0.04, 0.02, 0.01]
ORDER = [4, 0, 6, 2, 5, 1, 3]  # ORDER[j] is the token holding PROBS[j]
HAND_LOGITS = torch.empty(len(PROBS))
HAND_LOGITS[ORDER] = torch.tensor(PROBS).log()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every behavioural test runs on CPU in CI and on CUDA too under `-m gpu`."""
    return torch.device(request.param)


def sampling(**kwargs: object) -> OutputSpec:
    return OutputSpec(index=0, sampling=SamplingParams(**kwargs))  # type: ignore[arg-type]


def distribution(top_k: int) -> OutputSpec:
    return OutputSpec(index=0, distribution_top_k=top_k)


def tokens_of(results: list[OutputResult]) -> list[int]:
    assert all(r.token_id is not None for r in results)
    return [r.token_id for r in results]  # type: ignore[misc]


def packed(allowed: tuple[int, ...], vocab_size: int, num_bytes: int | None = None) -> bytes:
    """SamplingParams.allowed_token_mask for `allowed`: bit t % 8 of byte t // 8."""
    bits = np.zeros(8 * (num_bytes or -(-vocab_size // 8)), dtype=bool)
    bits[list(allowed)] = True
    return np.packbits(bits, bitorder="little").tobytes()


def unpacked(mask: bytes) -> list[int]:
    return np.flatnonzero(np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")).tolist()


def reference_penalties(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The formulas written out token by token (the slow, obvious way)."""
    out = logits.clone().float()
    for r, p in enumerate(params):
        for t in set(p.prompt_token_ids) | set(p.output_token_ids):
            v = out[r, t].item()
            out[r, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(p.output_token_ids):
            count = p.output_token_ids.count(t)
            out[r, t] -= p.frequency_penalty * count + p.presence_penalty
        for t, bias in dict(p.logit_bias).items():
            out[r, t] += bias
        allowed = p.allowed_token_ids if p.allowed_token_mask is None else unpacked(p.allowed_token_mask)
        if allowed is not None:
            banned = torch.ones(out.shape[1], dtype=torch.bool)
            banned[list(allowed)] = False
            out[r, banned] = -math.inf
    return out


# --- greedy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype, device: torch.device) -> None:
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(0)).to(dtype)
    results = Sampler(seed=0).sample(logits.to(device), [sampling() for _ in range(16)])
    assert tokens_of(results) == logits.argmax(dim=-1).tolist()
    assert all(r.logprob is None and r.top_logprobs == () and r.distribution == () for r in results)


def test_greedy_ignores_filters_and_follows_penalties_and_bias(device: torch.device) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(dim=-1).tolist()
    params = [
        SamplingParams(top_k=3, top_p=0.2, min_p=0.5),  # argmax-invariant for greedy
        SamplingParams(repetition_penalty=5.0, prompt_token_ids=(best[1],), frequency_penalty=2.0,
                       output_token_ids=(best[1], best[1])),
        SamplingParams(logit_bias=((best[2], -math.inf), (7, 0.25))),
    ]
    results = Sampler(seed=0).sample(logits.to(device), [OutputSpec(index=0, sampling=p) for p in params])
    expected = reference_penalties(logits, params).argmax(dim=-1).tolist()
    assert tokens_of(results) == expected
    assert expected[0] == best[0] and expected[2] != best[2]


def test_input_logits_are_not_modified(device: torch.device) -> None:
    logits = torch.randn(2, 30, device=device)
    before = logits.clone()
    specs = [sampling(temperature=0.8, top_p=0.5, repetition_penalty=1.5, prompt_token_ids=(1, 2),
                      logit_bias=((3, 4.0),), allowed_token_ids=(1, 2, 3)), sampling(frequency_penalty=1.0,
                                                                                      output_token_ids=(0,))]
    Sampler(seed=0).sample(logits, specs)
    assert torch.equal(logits, before)


# --- top-k / top-p / min-p ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "kept_ranks"),
    [
        ({"top_k": 2}, 2),
        ({"top_p": 0.6}, 2),  # mass before rank 2 is 0.70 >= 0.6
        ({"top_p": 0.8}, 3),  # mass before rank 3 is 0.85
        ({"min_p": 0.3}, 3),  # p >= 0.12
        ({"min_p": 0.5}, 2),  # p >= 0.20
        ({"top_k": 3, "top_p": 0.5}, 2),  # renormalised over the top 3: 0.47 then 0.82
        ({"top_k": 2, "top_p": 0.55}, 1),  # renormalised over the top 2: 0.57 (0.40 without renormalising)
        ({"top_k": 5, "top_p": 0.95, "min_p": 0.25}, 3),  # min-p is the tightest: p >= 0.10
        ({"temperature": 0.5, "min_p": 0.5}, 2),  # p ~ PROBS^2: 0.3^2 / 0.4^2 = 0.56 kept, 0.14 not
        ({"top_k": 2, "top_p": 0.9999999}, 2),  # top-p near 1 must not undo top-k
    ],
)
def test_filters_never_emit_excluded_tokens(filters: dict[str, float], kept_ranks: int, device: torch.device) -> None:
    num_rows = 400
    logits = HAND_LOGITS.repeat(num_rows, 1)
    params = {"temperature": 1.0, **filters}
    # Half the rows seeded (each its own seed), half drawing from the sampler's generator.
    specs = [sampling(**params, seed=r if r % 2 else None) for r in range(num_rows)]
    drawn = set(tokens_of(Sampler(seed=3).sample(logits.to(device), specs)))
    kept = set(ORDER[:kept_ranks])
    assert drawn == kept  # nothing excluded, and (400 draws) every kept token shows up


@pytest.mark.parametrize("scale", [3.0, 0.01])  # peaked, and so flat that top-p keeps thousands of tokens
def test_filters_on_random_logits_match_a_reference(scale: float, device: torch.device) -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 5000, generator=g) * scale
    specs = [sampling(temperature=1.0, top_k=5, seed=r) for r in range(32)]
    specs += [sampling(temperature=1.0, top_p=0.3 + r / 50, seed=r) for r in range(32)]
    drawn = tokens_of(Sampler(seed=0).sample(logits.to(device), specs))
    for r in range(32):
        assert drawn[r] in logits[r].topk(5).indices.tolist()
    for r in range(32, 64):
        probs, ids = logits[r].softmax(-1).sort(descending=True)
        num_kept = int(((probs.cumsum(0) - probs) < 0.3 + (r - 32) / 50).sum())
        assert drawn[r] in ids[:num_kept].tolist()
        if scale < 1:
            assert num_kept > 256  # the CPU path had to look past its first candidates


def reference_kept(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens that top-k, then top-p (renormalised), then min-p keep, by sorting."""
    probs, ids = (logits / p.temperature).softmax(-1).sort(descending=True)
    num_kept = p.top_k or len(ids)
    probs = probs[:num_kept] / probs[:num_kept].sum()
    num_kept = int(((probs.cumsum(0) - probs) < p.top_p).sum())
    ids, probs = ids[:num_kept], probs[:num_kept]
    return set(ids[probs >= p.min_p * probs[0]].tolist())


def test_filtered_weights_keep_exactly_the_reference_sets(device: torch.device) -> None:
    g = torch.Generator().manual_seed(12)
    logits = torch.cat([torch.randn(4, 5000, generator=g) * 3, torch.randn(4, 5000, generator=g) * 0.01])
    params = [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.7, top_k=40, top_p=0.8),
              SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=1.0, top_k=3000, top_p=0.9)]
    params += params
    draws = ship([Draws.build(params, 5000, torch.Generator())], device)[0]
    weights = filtered_weights(logits.to(device), draws).cpu()
    for r, p in enumerate(params):
        assert set(weights[r].nonzero()[:, 0].tolist()) == reference_kept(logits[r], p), (r, p)
    for r, p in enumerate(params):  # kept tokens keep their softmax(x / T) probability
        expected = (logits[r] / p.temperature).softmax(dim=-1)
        torch.testing.assert_close(weights[r], expected * (weights[r] > 0))


# --- seeds ----------------------------------------------------------------------------------------------


def test_same_seed_same_token_whatever_the_batch(device: torch.device) -> None:
    g = torch.Generator().manual_seed(11)
    row = torch.randn(1, 2000, generator=g)
    others = torch.randn(5, 2000, generator=g)
    spec = sampling(temperature=1.0, top_p=0.99, seed=1234, output_token_ids=(5, 6))
    sampler = Sampler(seed=0)
    alone = tokens_of(sampler.sample(row.to(device), [spec]))[0]
    batch = torch.cat([others[:3], row, others[3:]])
    other_specs = [sampling(temperature=0.7), sampling(), distribution(4)]
    mixed_specs = other_specs + [spec] + [sampling(temperature=2.0, seed=1)] * 2
    mixed = Sampler(seed=99).sample(batch.to(device), mixed_specs)
    assert mixed[3].token_id == alone
    for _ in range(3):  # the sampler's own generators have moved on; the seeded row must not notice
        sampler.sample(others.to(device), [sampling(temperature=1.0, seed=7)] * 5)
        assert tokens_of(sampler.sample(row.to(device), [spec]))[0] == alone


def test_different_seeds_and_steps_differ(device: torch.device) -> None:
    logits = torch.zeros(1, 1000, device=device)  # uniform: any draw is equally likely
    by_seed = {tokens_of(Sampler(seed=0).sample(logits, [sampling(temperature=1.0, seed=s)]))[0] for s in range(10)}
    assert len(by_seed) > 1
    steps = [sampling(temperature=1.0, seed=42, output_token_ids=(0,) * n) for n in range(10)]
    by_step = tokens_of(Sampler(seed=0).sample(logits.repeat(10, 1), steps))
    assert len(set(by_step)) > 1


def test_unseeded_rows_follow_the_sampler_generator(device: torch.device) -> None:
    logits = torch.zeros(20, 1000)
    specs = [sampling(temperature=1.0) for _ in range(20)]
    first = tokens_of(Sampler(seed=8).sample(logits.to(device), specs))
    assert first == tokens_of(Sampler(seed=8).sample(logits.to(device), specs))
    assert len(set(first)) > 1
    assert first != tokens_of(Sampler(seed=9).sample(logits.to(device), specs))


# --- masks and bias -------------------------------------------------------------------------------------


def test_positive_bias_forces_a_token(device: torch.device) -> None:
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(2))
    specs = [sampling(temperature=1.0, logit_bias=((123, 100.0),), seed=s) for s in range(50)]
    assert set(tokens_of(Sampler(seed=0).sample(logits.to(device), specs))) == {123}


def test_allowed_tokens_are_respected(device: torch.device) -> None:
    allowed = (3, 17, 250, 299)
    logits = torch.zeros(200, 300)
    logits[:, 0] = 50.0  # by far the best token, but not allowed
    specs = [sampling(temperature=1.0, allowed_token_ids=allowed) for _ in range(200)]
    drawn = tokens_of(Sampler(seed=0).sample(logits.to(device), specs))
    assert set(drawn) == set(allowed)
    logits[0, 250] = 1.0
    greedy = Sampler(seed=0).sample(logits[:1], [sampling(allowed_token_ids=allowed)])
    assert greedy[0].token_id == 250


@pytest.mark.parametrize("vocab_size", [296, 301])  # a whole number of bytes, and a last byte used in part
def test_a_packed_mask_acts_as_the_same_ids(vocab_size: int, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, vocab_size, generator=gen) * 3
    sets = [tuple(sorted(torch.randperm(vocab_size, generator=gen)[:k].tolist())) for k in (1, 5, 150, 290)]
    sets.append((vocab_size - 1,))  # the last token, in the last byte's highest used bit
    rows_ids = [SamplingParams(allowed_token_ids=a) for a in sets] + [SamplingParams()]
    # Masks one byte longer than needed (llguidance pads to whole int32 words); the extra byte is zero.
    rows_mask = [SamplingParams(allowed_token_mask=packed(a, vocab_size, -(-vocab_size // 8) + 1)) for a in sets]
    rows_mask.append(SamplingParams())
    by_ids = apply_penalties(logits.to(device), ship([Penalties.build(rows_ids, vocab_size)], device)[0]).cpu()
    by_mask = apply_penalties(logits.to(device), ship([Penalties.build(rows_mask, vocab_size)], device)[0]).cpu()
    assert torch.equal(by_mask, by_ids)
    torch.testing.assert_close(by_mask, reference_penalties(logits, rows_mask), rtol=0, atol=0)
    specs = [OutputSpec(index=0, sampling=p) for p in rows_mask]
    greedy = tokens_of(Sampler(seed=0).sample(logits.to(device), specs))
    assert all(t in a for t, a in zip(greedy, sets)) and greedy[-2] == vocab_size - 1
    drawn = tokens_of(Sampler(seed=0).sample(logits[3:4].repeat(300, 1).to(device),
                                             [sampling(temperature=5.0, allowed_token_mask=packed(sets[2], vocab_size))
                                              for _ in range(300)]))
    assert set(drawn) <= set(sets[2]) and len(set(drawn)) > 20


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (packed((3,), 50)[:-1], "has 6 bytes, the vocabulary needs 7"),
        (packed((3, 50), 50), "outside the vocabulary"),  # bit 50 is in the last byte, beyond V
        (packed((3,), 50) + b"\x01", "outside the vocabulary"),  # a byte past the vocabulary's
        (packed((), 50) + b"\x01", "outside the vocabulary"),
    ],
)
def test_bad_masks_raise_value_error(mask: bytes, message: str, device: torch.device) -> None:
    with pytest.raises(ValueError, match=message):
        Sampler().sample(torch.zeros(2, 50, device=device), [sampling(), sampling(allowed_token_mask=mask)])


def test_a_mask_must_allow_a_token_and_not_come_with_ids() -> None:
    with pytest.raises(ValueError, match="allows no token"):
        SamplingParams(allowed_token_mask=bytes(7))
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(allowed_token_ids=(1,), allowed_token_mask=packed((1,), 50))


def test_a_row_with_every_token_banned_still_gets_a_valid_id(device: torch.device) -> None:
    logits = torch.randn(2, 50, device=device)
    banned = {"allowed_token_ids": (3,), "logit_bias": ((3, -math.inf),)}
    results = Sampler(seed=0).sample(logits, [sampling(temperature=1.0, **banned), sampling(**banned)])
    assert all(0 <= t < 50 for t in tokens_of(results))


# --- penalties ------------------------------------------------------------------------------------------


def test_penalties_follow_the_formulas_exactly(device: torch.device) -> None:
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(4)) * 4
    params = [
        SamplingParams(repetition_penalty=1.3, prompt_token_ids=(1, 2, 3, 3), output_token_ids=(4, 1)),
        SamplingParams(frequency_penalty=0.5, presence_penalty=-0.7, output_token_ids=(5, 5, 5, 6, 0)),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=1.5, presence_penalty=0.25,
                       prompt_token_ids=(9, 10), output_token_ids=(10, 11, 11),
                       logit_bias=((11, 2.0), (12, -3.0), (11, 0.5)), allowed_token_ids=(10, 11, 12, 13)),
        SamplingParams(prompt_token_ids=(1, 2), output_token_ids=(3,)),  # no penalties: unchanged
    ]
    penalties = ship([Penalties.build(params, vocab_size=40)], device)[0]
    processed = apply_penalties(logits.to(device), penalties).cpu()
    expected = reference_penalties(logits, params)
    assert processed.dtype == torch.float32
    torch.testing.assert_close(processed, expected, rtol=0, atol=1e-6)
    assert torch.equal(processed[3], logits[3])
    assert processed[2, 11] == expected[2, 11]  # duplicate bias entries: the last one wins


# --- logprobs and distributions -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype: torch.dtype, device: torch.device) -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(5)).to(dtype)
    specs = [
        sampling(temperature=0.5, top_k=10, repetition_penalty=2.0, prompt_token_ids=(1,), num_logprobs=5,
                 seed=1),
        sampling(num_logprobs=0),
        sampling(temperature=1.0, num_logprobs=20, logit_bias=((3, 5.0),), seed=2),
    ]
    results = Sampler(seed=0).sample(logits.to(device), specs)
    reference = logits.float().log_softmax(dim=-1)
    for r, (result, n) in enumerate(zip(results, [5, 0, 20])):
        assert result.token_id is not None and result.logprob is not None
        assert result.logprob == pytest.approx(reference[r, result.token_id].item(), abs=1e-5)
        assert len(result.top_logprobs) == n
        values = [v for _, v in result.top_logprobs]
        assert values == sorted(values, reverse=True)
        # The best n values, each the logprob of its token (bf16 ties may order equal tokens either way).
        assert values == pytest.approx(reference[r].topk(n).values.tolist(), abs=1e-5)
        assert values == pytest.approx([reference[r, t].item() for t, _ in result.top_logprobs], abs=1e-5)
        assert len({t for t, _ in result.top_logprobs}) == n


def test_equal_logits_rank_by_token_id_so_greedy_comes_first(device: torch.device) -> None:
    # bf16 logits tie often (8 bits of mantissa); topk alone may order equal values either way.
    logits = torch.full((1, 4096), -4.0)
    logits[0, [3001, 7, 2048, 515]] = 2.0  # four equal maxima
    logits[0, [4000, 9]] = 1.0
    logits = logits.to(torch.bfloat16).to(device)
    greedy, = Sampler(seed=0).sample(logits, [sampling(num_logprobs=6)])
    assert greedy.token_id == 7
    assert [t for t, _ in greedy.top_logprobs] == [7, 515, 2048, 3001, 9, 4000]
    shown, = Sampler(seed=0).sample(logits, [distribution(5)])
    assert [t for t, _ in shown.distribution] == [7, 515, 2048, 3001, 9]


def test_distribution_is_the_top_of_the_raw_softmax(device: torch.device) -> None:
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    results = Sampler(seed=0).sample(logits.to(device), [distribution(5), distribution(100)])
    probs = logits.softmax(dim=-1)
    for r, (result, k) in enumerate(zip(results, [5, 64])):
        assert result.token_id is None and result.logprob is None
        assert len(result.distribution) == k
        assert sum(p for _, p in result.distribution) <= 1.0 + 1e-6
        top = probs[r].topk(k)
        assert [t for t, _ in result.distribution] == top.indices.tolist()
        assert [p for _, p in result.distribution] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert sum(p for _, p in results[1].distribution) == pytest.approx(1.0, abs=1e-5)


def test_mixed_batch_returns_each_kind_in_order(device: torch.device) -> None:
    logits = torch.randn(5, 80, generator=torch.Generator().manual_seed(8))
    specs = [distribution(3), sampling(), sampling(temperature=0.9, seed=3, num_logprobs=2), distribution(1),
             sampling(temperature=1.0)]
    results = Sampler(seed=0).sample(logits.to(device), specs)
    assert [r.token_id is None for r in results] == [True, False, False, True, False]
    assert results[1].token_id == logits[1].argmax().item() and results[1].logprob is None
    assert len(results[2].top_logprobs) == 2 and results[2].logprob is not None
    assert results[3].distribution[0][0] == logits[3].argmax().item()
    assert len(results[0].distribution) == 3 and results[4].top_logprobs == ()


def test_empty_batch() -> None:
    assert Sampler().sample(torch.zeros(0, 10), []) == []


# --- the distribution of draws --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "seeded", "num_kept"),
    [({"temperature": 1.0}, False, 5), ({"temperature": 1.0}, True, 5), ({"temperature": 2.0}, False, 5),
     ({"temperature": 1.0, "top_k": 3}, False, 3), ({"temperature": 1.0, "top_p": 0.6}, True, 2)],
)
def test_empirical_frequencies_match_softmax(
    params: dict[str, float], seeded: bool, num_kept: int, device: torch.device
) -> None:
    num_draws = 20000
    logits = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0])
    specs = [sampling(**params, seed=s if seeded else None) for s in range(num_draws)]
    drawn = torch.tensor(tokens_of(Sampler(seed=0).sample(logits.repeat(num_draws, 1).to(device), specs)))
    expected = (logits / params["temperature"]).softmax(dim=-1)
    expected[num_kept:] = 0.0  # the logits are in descending order; softmax: .50 .30 .11 .07 .02
    expected /= expected.sum()
    frequencies = torch.bincount(drawn, minlength=5).float() / num_draws
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"logit_bias": ((50, 1.0),)},
        {"logit_bias": ((-1, 1.0),)},
        {"allowed_token_ids": (1, 50)},
        {"repetition_penalty": 1.2, "prompt_token_ids": (3, 99)},
        {"frequency_penalty": 0.5, "output_token_ids": (50,)},
        {"presence_penalty": 0.5, "output_token_ids": (-2,)},
        {"logit_bias": ((2, float("nan")),)},
    ],
)
def test_bad_token_ids_raise_value_error(params: dict[str, object], device: torch.device) -> None:
    logits = torch.zeros(2, 50)
    with pytest.raises(ValueError, match="token id|logit_bias"):
        Sampler().sample(logits.to(device), [sampling(), sampling(temperature=1.0, **params)])  # type: ignore[arg-type]


def test_bad_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="2 rows but 1"):
        Sampler().sample(torch.zeros(2, 5), [sampling()])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        Sampler().sample(torch.zeros(5), [sampling()])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        Sampler().sample(torch.zeros(1, 5, dtype=torch.int64), [sampling()])


# --- CUDA -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_matches_cpu_where_deterministic() -> None:
    assert torch.cuda.is_available()
    logits = torch.randn(8, 128256, generator=torch.Generator().manual_seed(9))
    specs = [sampling(), sampling(num_logprobs=3), distribution(4),
             sampling(temperature=1.0, top_k=1, seed=3), sampling(temperature=0.8, top_p=0.9, seed=4),
             sampling(temperature=1.0, min_p=0.2), sampling(repetition_penalty=1.5, prompt_token_ids=(1, 2)),
             sampling(allowed_token_ids=(5, 6, 7))]
    on_cpu = Sampler(seed=0).sample(logits, specs)
    on_cuda = Sampler(seed=0).sample(logits.cuda().bfloat16().float(), specs)
    on_cuda_exact = Sampler(seed=0).sample(logits.cuda(), specs)
    for r in (0, 1, 3, 6, 7):
        assert on_cuda_exact[r].token_id == on_cpu[r].token_id
    assert on_cuda_exact[1].logprob == pytest.approx(on_cpu[1].logprob, abs=1e-4)
    assert [t for t, _ in on_cuda_exact[2].distribution] == [t for t, _ in on_cpu[2].distribution]
    seeded_alone = Sampler(seed=1).sample(logits[4:5].cuda(), specs[4:5])
    assert seeded_alone[0].token_id == on_cuda_exact[4].token_id
    assert len(on_cuda) == 8


@pytest.mark.parametrize("num_cols,chunk", [(128256, 256), (49152, 2048), (4096, 64)])
def test_chunked_argmax_equals_argmax_with_ties(num_cols: int, chunk: int) -> None:
    """The two-stage argmax of CUDA rows (argmax_rows) picks the first maximum, as torch.argmax does."""
    gen = torch.Generator().manual_seed(num_cols)
    x = torch.randint(-50, 50, (5, num_cols), generator=gen).float()  # many ties below the maximum
    x[1, 7], x[1, num_cols - 3] = 99.0, 99.0  # a tie for the maximum across chunks: the first one wins
    x[2, chunk - 1], x[2, chunk] = 99.0, 99.0  # ... on the two sides of a chunk border
    x[3] = 1.0  # all equal: index 0
    want = x.argmax(dim=-1)
    assert want[1] == 7 and want[2] == chunk - 1 and want[3] == 0
    assert torch.equal(_chunked_argmax(x, chunk), want)
    assert torch.equal(argmax_rows(x), want)  # (CPU: torch's argmax itself)


def test_plain_greedy_rows_share_one_result_per_token(device: torch.device) -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [5.0, 0.0, 1.0]], device=device)
    results = Sampler(seed=0).launch(logits, [sampling()] * 3).results()
    assert results == [OutputResult(token_id=1), OutputResult(token_id=1), OutputResult(token_id=0)]
    assert results[0] is results[1]  # immutable: one object per token id (sampler.greedy_result)
    with_logprob = Sampler(seed=0).launch(logits[:1], [sampling(num_logprobs=0)]).results()
    assert with_logprob[0].token_id == 1 and with_logprob[0].logprob is not None  # not plain greedy: its own

"""build_step_inputs (engine/executor/step_inputs.py): decode steps take a shorter way that must give exactly the
inputs and the errors of the general one; the host metadata (kernels/flashinfer_attention.py) uses the rows it
hands over."""
from __future__ import annotations

import dataclasses
import random

import msgspec
import numpy as np
import pytest

from pie_server.engine.executor import step_inputs
from pie_server.engine.executor.cuda_graphs import CudaGraphDecoder
from pie_server.engine.step import ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.kernels.flashinfer_attention import build_host_metadata

PAGE_SIZE, NUM_PAGES, GREEDY = 4, 512, SamplingParams()


class Model:
    vocab_size = 100
    max_position_embeddings = 4096


def decodes(rng: random.Random, num_seqs: int) -> list[ForwardCommand]:
    """Valid decode commands over disjoint pages: 0 or 1 outputs, some fed from the step before."""
    pages = rng.sample(range(NUM_PAGES), num_seqs * 8)
    commands = []
    for b in range(num_seqs):
        own = pages[b * 8:b * 8 + rng.randint(1, 8)]
        last_len = rng.randint(1, PAGE_SIZE)
        position = (len(own) - 1) * PAGE_SIZE + last_len - 1
        outputs = (OutputSpec(0, GREEDY),) if rng.random() < 0.9 else ()
        fed = TokenRef(3, rng.randrange(num_seqs)) if rng.random() < 0.7 else None
        commands.append(ForwardCommand([rng.randrange(100)], [position], own, last_len, outputs, None, fed))
    return commands


def same_inputs(a: step_inputs.StepInputs, b: step_inputs.StepInputs) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "attention":
            for inner in dataclasses.fields(x):
                assert np.array_equal(np.asarray(getattr(x, inner.name)), np.asarray(getattr(y, inner.name))), inner
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("seed", range(20))
def test_decode_steps_get_the_general_inputs(seed: int) -> None:
    rng = random.Random(seed)
    commands = decodes(rng, rng.choice([1, 2, 7, 64]))
    fast = step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES)
    same_inputs(fast, step_inputs._any_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES))
    assert list(fast.attention.source_rows) == list(range(len(commands)))


def _broken(kind: str) -> list[ForwardCommand]:
    commands = decodes(random.Random(1), 6)
    c = commands[3]
    changed = {
        "token": dict(token_ids=[100]), "position": dict(positions=[4096]), "two positions": dict(positions=[1, 2]),
        "no page": dict(page_ids=[]), "page": dict(page_ids=[*c.page_ids[:-1], NUM_PAGES]),
        "page twice": dict(page_ids=[c.page_ids[0], *c.page_ids]), "last len": dict(last_page_len=0),
        "output": dict(outputs=(OutputSpec(1, GREEDY),)),
        "slot": dict(page_ids=commands[2].page_ids, last_page_len=commands[2].last_page_len),
    }[kind]
    commands[3] = msgspec.structs.replace(c, **changed)
    return commands


@pytest.mark.parametrize("kind", ["token", "position", "two positions", "no page", "page", "page twice", "last len",
                                  "output", "slot"])
def test_bad_decode_steps_get_the_general_errors(kind: str) -> None:
    commands = _broken(kind)
    with pytest.raises(ValueError) as general:
        step_inputs._any_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES)
    with pytest.raises(ValueError) as fast:
        step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES)
    assert str(fast.value) == str(general.value) and "forward command 3" in str(fast.value)


@pytest.fixture
def keep_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """PageArrays for these tests' short page lists too (the executor keeps them from KEEP_MIN_PAGES on)."""
    monkeypatch.setattr(step_inputs, "KEEP_MIN_PAGES", 1)


def _as_tuples(commands: list[ForwardCommand]) -> list[ForwardCommand]:
    return [msgspec.structs.replace(c, page_ids=tuple(c.page_ids)) for c in commands]


def _next_step(rng: random.Random, commands: list[ForwardCommand]) -> list[ForwardCommand]:
    """Each decode one token on, passing its page tuple on, except some that take a new one (as a decode that
    opens a page or whose blocks moved does); rows may also leave or swap places."""
    following = []
    for c in commands:
        pages = c.page_ids if rng.random() < 0.7 else tuple(list(c.page_ids))  # equal, a new object
        following.append(msgspec.structs.replace(c, positions=[c.positions[0]], page_ids=pages))
    rng.shuffle(following)
    return following[:max(1, len(following) - rng.randrange(2))]


@pytest.mark.parametrize("seed", range(10))
def test_kept_page_arrays_give_the_same_inputs_step_after_step(seed: int, keep_all: None) -> None:
    """PageArrays: page tuples passed on from the step before are not converted again, and every step's inputs
    equal those built from scratch."""
    rng = random.Random(seed)
    arrays = step_inputs.PageArrays()
    commands = _as_tuples(decodes(rng, rng.choice([1, 7, 64])))
    for _ in range(6):
        kept = step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES, arrays)
        same_inputs(kept, step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES))
        commands = _next_step(rng, commands)


def test_kept_page_arrays_convert_only_new_tuples(monkeypatch: pytest.MonkeyPatch, keep_all: None) -> None:
    arrays = step_inputs.PageArrays()
    commands = _as_tuples(decodes(random.Random(2), 8))
    step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES, arrays)
    converted = []
    fromiter = np.fromiter

    def recorded(values, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        converted.append(values)
        return fromiter(values, *args, **kwargs)

    monkeypatch.setattr(np, "fromiter", recorded)
    commands[5] = msgspec.structs.replace(commands[5], page_ids=tuple(list(commands[5].page_ids)))  # equal, new
    commands[6] = msgspec.structs.replace(commands[6], page_ids=list(commands[6].page_ids))  # lists are never kept
    step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES, arrays)
    assert [pages for pages in converted if pages is commands[5].page_ids or pages is commands[6].page_ids] == [
        commands[5].page_ids, commands[6].page_ids]
    assert not any(pages is c.page_ids for pages in converted for c in commands[:5] + commands[7:])


@pytest.mark.parametrize("kind", ["token", "position", "page", "page twice"])
def test_kept_page_arrays_give_the_general_errors_and_keep_no_bad_list(kind: str, keep_all: None) -> None:
    """A bad page tuple fails as in the general way, in the same order of checks, and is checked again next time
    (it was not kept); a bad token beside kept pages is still the token's error."""
    arrays = step_inputs.PageArrays()
    good = _as_tuples(decodes(random.Random(1), 6))
    step_inputs.build_step_inputs(good, Model, PAGE_SIZE, NUM_PAGES, arrays)  # all kept now
    commands = _as_tuples(_broken(kind))
    commands = [g if k != 3 and kind in ("token", "position") else c for k, (g, c) in enumerate(zip(good, commands))]
    with pytest.raises(ValueError) as general:
        step_inputs._any_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES)
    for _ in range(2):
        with pytest.raises(ValueError) as kept:
            step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES, arrays)
        assert str(kept.value) == str(general.value) and "forward command 3" in str(kept.value)


def test_short_contexts_keep_no_page_arrays() -> None:
    """Below KEEP_MIN_PAGES pages per command on average the lists are converted as without PageArrays."""
    arrays = step_inputs.PageArrays()
    short = _as_tuples(decodes(random.Random(3), 8))
    step_inputs.build_step_inputs(short, Model, PAGE_SIZE, NUM_PAGES, arrays)
    assert not arrays._arrays
    num_long = step_inputs.KEEP_MIN_PAGES
    pages = random.Random(4).sample(range(NUM_PAGES), 2 * num_long)
    long = [ForwardCommand([1], [(num_long - 1) * PAGE_SIZE], tuple(own), 1, (OutputSpec(0, GREEDY),))
            for own in (pages[:num_long], pages[num_long:])]
    step_inputs.build_step_inputs(long, Model, PAGE_SIZE, NUM_PAGES, arrays)
    assert sorted(arrays._arrays) == sorted(id(c.page_ids) for c in long)


def test_host_metadata_takes_the_builders_rows_also_when_padded() -> None:
    commands = decodes(random.Random(5), 5)
    step = step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES).attention
    for given in (step, CudaGraphDecoder._padded(step, 8)):
        found = build_host_metadata(dataclasses.replace(given, source_rows=None))  # np.unique's answer
        used = build_host_metadata(given)
        assert np.array_equal(used.source_rows, found.source_rows) and used.source_rows.dtype == np.int64
    assert list(build_host_metadata(CudaGraphDecoder._padded(step, 8)).source_rows) == [0, 1, 2, 3, 4, 0, 0, 0]

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


def test_host_metadata_takes_the_builders_rows_also_when_padded() -> None:
    commands = decodes(random.Random(5), 5)
    step = step_inputs.build_step_inputs(commands, Model, PAGE_SIZE, NUM_PAGES).attention
    for given in (step, CudaGraphDecoder._padded(step, 8)):
        found = build_host_metadata(dataclasses.replace(given, source_rows=None))  # np.unique's answer
        used = build_host_metadata(given)
        assert np.array_equal(used.source_rows, found.source_rows) and used.source_rows.dtype == np.int64
    assert list(build_host_metadata(CudaGraphDecoder._padded(step, 8)).source_rows) == [0, 1, 2, 3, 4, 0, 0, 0]

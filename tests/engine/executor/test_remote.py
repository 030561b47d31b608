"""The executor in a worker process (engine/executor/remote.py): the same results as in-process, fed tokens across
pipelined steps, errors answered per step, and a worker that dies or cannot start reported, never waited on."""
from __future__ import annotations

from typing import Iterator

import pytest

from pie_server.engine.config import EngineConfig
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.remote import RemoteExecutor, WorkerSpec
from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, StepResult, TokenRef
from tests.engine.control.decodes import decode_all
from tests.engine.executor.test_executor import PAGE_SIZE, TINY

pytestmark = pytest.mark.timeout(120)
GREEDY = SamplingParams()
CONFIG = EngineConfig(page_size=PAGE_SIZE, num_pages=32, seed=3)


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteExecutor]:
    executor = RemoteExecutor(WorkerSpec(None, TINY, CONFIG))  # random weights, the same as Executor(TINY, CONFIG)
    yield executor
    executor.close()


def _prefill(tokens: list[int], page: int) -> ForwardCommand:
    return ForwardCommand(token_ids=tokens, positions=list(range(len(tokens))), page_ids=[page],
                          last_page_len=len(tokens), outputs=(OutputSpec(len(tokens) - 1, GREEDY),))


def _fed(position: int, page: int, command_index: int) -> ForwardCommand:
    return ForwardCommand(token_ids=[0], positions=[position], page_ids=[page], last_page_len=position + 1,
                          outputs=(OutputSpec(0, GREEDY),), fed_token=TokenRef(command_index))


def _tokens(result: StepResult) -> list[int | None]:
    return [output.token_id for command in result.results for output in command.outputs]


def test_pipelined_steps_give_the_in_process_results(remote: RemoteExecutor) -> None:
    local = Executor(TINY, CONFIG)
    assert remote.info == local.info and remote.num_swap_slots == local.num_swap_slots
    steps = [Batch(forwards=[_prefill([1, 2], 0), _prefill([4, 5], 1)], step_id=1),
             Batch(forwards=[_fed(2, 0, 0), _fed(2, 1, 1)], step_id=2),
             Batch(forwards=[_fed(3, 1, 1), _fed(3, 0, 0)], step_id=3)]  # rows swapped: refs follow commands
    for executor in (remote, local):
        pending = [executor.submit(batch) for batch in steps]  # all submitted before any is read
        results = [step.result() for step in pending]
        if executor is remote:
            remote_tokens = [_tokens(result) for result in results]
        else:
            assert [_tokens(result) for result in results] == remote_tokens
    assert [step.step_id for step in pending] == [1, 2, 3]


def test_a_bad_step_is_answered_with_its_error_and_nothing_is_fed_from_it(remote: RemoteExecutor) -> None:
    good = remote.submit(Batch(forwards=[_prefill([1, 2], 2)], step_id=10))
    bad = remote.submit(Batch(forwards=[_prefill([TINY.vocab_size + 5], 3)], step_id=11))
    fed = remote.submit(Batch(forwards=[_fed(2, 2, 0)], step_id=12))  # would take a token of the bad step
    assert len(_tokens(good.result())) == 1
    with pytest.raises(ValueError, match="token id"):
        bad.result()
    with pytest.raises(ValueError, match="sampled none"):
        fed.result()
    assert len(_tokens(remote.execute(Batch(forwards=[_prefill([7], 4)], step_id=13)))) == 1  # it goes on


def test_decodes_two_steps_ahead_through_the_worker_equal_serial_ones(remote: RemoteExecutor) -> None:
    prompts, max_new = ([3, 9, 4], [5, 1, 7, 2, 8]), (9, 10)
    serial = decode_all(Executor(TINY, CONFIG), ControlConfig(), prompts, max_new, PAGE_SIZE)
    assert [len(tokens) for tokens in serial] == [9, 10]
    ahead = ControlConfig(pipeline=True, speculation_depth=2)
    assert decode_all(remote, ahead, prompts, max_new, PAGE_SIZE) == serial


def test_a_worker_that_dies_is_reported_not_waited_for() -> None:
    lost: list[BaseException] = []
    executor = RemoteExecutor(WorkerSpec(None, TINY, CONFIG), on_lost=lost.append)
    try:
        executor._process.kill()
        executor._process.join()
        with pytest.raises(RuntimeError, match="executor process has exited"):
            executor.execute(Batch(forwards=[_prefill([1], 0)], step_id=1))
        assert lost
    finally:
        executor.close()


def test_a_worker_that_cannot_start_says_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="failed to start"):
        RemoteExecutor(WorkerSpec(tmp_path / "no-such-model", TINY, CONFIG))


def test_tensor_parallelism_is_refused() -> None:
    with pytest.raises(ValueError, match="tensor parallelism"):
        RemoteExecutor(WorkerSpec(None, TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=32, tensor_parallel_size=2)))


def test_an_answer_read_for_another_step_is_refused() -> None:
    """Every step's answer is read once, in order (the step loop's contract): one read for a later step fails
    rather than hand it the earlier step's tokens."""
    executor = RemoteExecutor(WorkerSpec(None, TINY, CONFIG), on_lost=lambda error: None)
    try:
        executor.submit(Batch(forwards=[_prefill([1, 2], 0)], step_id=1))
        second = executor.submit(Batch(forwards=[_prefill([3], 1)], step_id=2))
        with pytest.raises(RuntimeError, match="answered step 1 where step 2 was due"):
            second.result()
    finally:
        executor.close()

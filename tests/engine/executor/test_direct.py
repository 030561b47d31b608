"""DirectGenerator (engine/executor/direct.py) beyond what the model checks use."""
from __future__ import annotations

from pie_server.engine.config import EngineConfig
from pie_server.engine.executor.direct import DirectGenerator
from pie_server.engine.executor.executor import Executor
from pie_server.engine.step import Batch, StepResult
from tests.engine.executor.test_executor import GREEDY, PAGE_SIZE, TINY


def test_a_cached_start_reserves_its_pages_and_feeds_only_its_last_token() -> None:
    executor = Executor(TINY, EngineConfig(page_size=PAGE_SIZE, num_pages=16, seed=3))
    batches: list[Batch] = []
    execute = executor.execute

    def recording(batch: Batch) -> StepResult:
        batches.append(batch)
        return execute(batch)

    executor.execute = recording  # type: ignore[method-assign]
    gen = DirectGenerator(executor)
    seq = gen.start_cached([1, 2, 3, 4, 5, 6])
    assert (len(seq.page_ids), seq.num_cached) == (2, 5)
    [token] = gen.step([seq], GREEDY)
    [command] = batches[0].forwards
    assert list(command.token_ids) == [6] and list(command.positions) == [5]
    assert token is not None and seq.token_ids == [1, 2, 3, 4, 5, 6, token] and seq.num_cached == 6

"""What the engine did while an inferlet ran: the forwards in each step it submitted, and the most KV pages in
use at any step (physical pages: a page shared by several contexts counts once). For tests that check
batching (branches decoded in the same steps) and page sharing or bounded memory from outside the inferlet,
which cannot see physical pages itself."""
from __future__ import annotations

from typing import Any

from pie_server.engine.engine import Engine


class StepRecorder:
    """`with StepRecorder(engine) as steps:` wraps the executor's submit for the block's duration."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._submit: Any = None
        self.batch_sizes: list[int] = []  # forwards per step, in order (steps with forwards only)
        self.peak_used_pages = 0

    @property
    def num_steps(self) -> int:
        return len(self.batch_sizes)

    def __enter__(self) -> "StepRecorder":
        executor = self._engine.executor
        self._submit = executor.submit

        def submit(batch: Any) -> Any:
            if batch.forwards:
                self.batch_sizes.append(len(batch.forwards))
            stats = self._engine.control.stats()  # the batch's pages are allocated by now
            self.peak_used_pages = max(self.peak_used_pages, stats.num_pages - stats.num_free_pages)
            return self._submit(batch)

        executor.submit = submit  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self._engine.executor.submit  # back to the class's method

"""The controllers a test makes, checked on the way out: stopped, every instance closed, and every page,
block and swap slot back in the pool once the prefix cache is dropped."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller


class Controllers:
    def __init__(self) -> None:
        self.made: list[Controller] = []

    def make(self, executor: FakeExecutor, config: ControlConfig) -> Controller:
        controller = Controller(executor, config)
        self.made.append(controller)
        return controller


@pytest.fixture
def controllers() -> Iterator[Controllers]:
    made = Controllers()
    yield made
    for controller in made.made:
        controller.stop()
        stats = controller.stats()
        assert stats.num_instances == 0 and stats.num_free_pages == stats.num_pages
        controller.clear_prefix_cache()
        pool = controller.state.res.pool
        assert pool.num_free_pages == stats.num_pages and pool.num_blocks == 0
        assert pool.num_free_swap_slots == pool.num_swap_slots

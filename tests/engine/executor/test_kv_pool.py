"""The host swap space of the KV pool: its default and `--swap-space` (EngineConfig.swap_space_gib)."""
from __future__ import annotations

import pytest

from pie_server.engine.config import EngineConfig
from pie_server.engine.executor.kv_pool import plan_num_swap_slots

MIB = 1 << 20


def test_default_swap_is_1_gib_at_most_the_pools_size() -> None:
    assert plan_num_swap_slots(num_pages=100, bytes_per_page=MIB, swap_space_gib=None) == 100
    assert plan_num_swap_slots(num_pages=5000, bytes_per_page=MIB, swap_space_gib=None) == 1024
    assert plan_num_swap_slots(num_pages=10, bytes_per_page=4 << 30, swap_space_gib=None) == 1  # never none


def test_a_swap_space_is_that_many_bytes_of_pages_whatever_the_pool() -> None:
    assert plan_num_swap_slots(num_pages=100, bytes_per_page=MIB, swap_space_gib=4) == 4096
    assert plan_num_swap_slots(num_pages=100, bytes_per_page=MIB, swap_space_gib=0.25) == 256
    assert plan_num_swap_slots(num_pages=100, bytes_per_page=4 << 30, swap_space_gib=1) == 1


@pytest.mark.parametrize("gib", [0, -1.0])
def test_a_swap_space_must_be_positive(gib: float) -> None:
    with pytest.raises(ValueError, match="swap_space_gib"):
        EngineConfig(swap_space_gib=gib)

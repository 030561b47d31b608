"""engine/core/process.py: the CPU list that PIE_CORE_CPUS pins the engine core to."""
from __future__ import annotations

import pytest

from pie_server.engine.core.process import parse_cpus


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    assert parse_cpus("3") == {3}
    assert parse_cpus("3,11") == {3, 11}
    assert parse_cpus("2-5, 9") == {2, 3, 4, 5, 9}


@pytest.mark.parametrize("text", ["", "a", "5-2", "-1", "1,,2"])
def test_malformed_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpus(text)

"""engine.control.admission: page estimates and the FIFO reservation of pages that every front end shares."""
from __future__ import annotations

import threading

import pytest

from pie_server.engine.control.admission import Admission, pages_for


def test_pages_for_counts_prompt_once_and_output_per_choice() -> None:
    def pages(prompt: list[int], output: list[int], n: int) -> int:
        return pages_for(prompt, output, n, page_size=16, max_output_reserve=64, num_pages=100)

    assert pages([20], [10], 1) == 2 + 1 + 1
    assert pages([20], [10], 3) == 2 + 3 * (1 + 1)
    assert pages([20], [5000], 1) == 2 + 4 + 1  # output reserve capped at 64 tokens
    assert pages([16, 33], [16, 16], 2) == 1 + 2 * 2 + 3 + 2 * 2
    assert pages([100_000], [1], 1) == 100  # larger than the pool: runs alone


def test_reservations_are_fifo_and_survive_cancellation() -> None:
    admission = Admission(10)
    admission.reserve(8).result(timeout=0)
    big, small, cancelled = admission.reserve(6), admission.reserve(1), admission.reserve(3)
    assert not (big.done() or small.done()) and admission.num_waiting == 3  # small fits, but waits behind big
    assert cancelled.cancel() and admission.num_waiting == 2
    admission.release(8)
    big.result(timeout=0), small.result(timeout=0)
    assert admission.num_free == 10 - 6 - 1
    with pytest.raises(ValueError):
        admission.reserve(11)
    admission.release(7)
    assert admission.num_free == 10


def test_a_cancelled_head_lets_the_next_one_in() -> None:
    admission = Admission(4)
    admission.reserve(3).result(timeout=0)
    head, behind = admission.reserve(4), admission.reserve(1)
    assert not behind.done()
    head.cancel()
    behind.result(timeout=0)  # granted when the head gave up, no release needed
    assert admission.num_free == 0


def test_a_granted_reservation_cannot_be_cancelled_and_is_released_by_its_owner() -> None:
    admission = Admission(2)
    granted = admission.reserve(2)
    assert not granted.cancel()  # the owner must release it
    admission.release(2)
    assert admission.num_free == 2


def test_many_threads() -> None:
    admission = Admission(5)

    def worker() -> None:
        for _ in range(200):
            admission.reserve(2).result(timeout=10)
            admission.release(2)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert admission.num_free == 5 and admission.num_waiting == 0

"""The controller's page API: allocation, quotas, argument validation, sharing, masks, the prefix cache."""
from __future__ import annotations

from typing import Callable

import pytest

from tests.engine.control.fake_executor import FakeExecutor
from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.control.api import ControlError, VirtualForward
from pie_server.engine.control.config import DEFAULT_MAX_PAGE_IDS, ControlConfig
from pie_server.engine.control.controller import Controller
from tests.engine.control.conftest import Controllers
from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId

GREEDY = SamplingParams()
A, B, C = InstanceId("a"), InstanceId("b"), InstanceId("c")
Make = Callable[..., tuple[Controller, FakeExecutor]]


@pytest.fixture
def make(controllers: Controllers) -> Make:  # every test closes its instances and unexports its names
    def factory(num_pages: int = 16, page_size: int = 4, max_context_len: int | None = None,
                **config: int) -> tuple[Controller, FakeExecutor]:
        executor = FakeExecutor(num_pages=num_pages, page_size=page_size, vocab_size=100,
                                max_context_len=max_context_len)
        return controllers.make(executor, ControlConfig(**{"vocab_size": 100, **config})), executor

    return factory


def alloc(controller: Controller, instance: InstanceId, n: int) -> list[int]:
    return controller.allocate_pages(instance, n).result(timeout=0)


def prefill(controller: Controller, instance: InstanceId, tokens: list[int], pages: list[int]) -> int:
    """Writes tokens at positions 0.. into pages; returns the greedy next token."""
    page_size = controller.info.page_size
    last = len(tokens) - (len(pages) - 1) * page_size
    future = controller.forward(instance, VirtualForward(
        tokens, list(range(len(tokens))), pages, last, [OutputSpec(len(tokens) - 1, GREEDY)]))
    while not future.done():
        assert controller.step()
    return future.result(timeout=0).outputs[0].token_id


def test_allocate_free_and_counts(make: Make) -> None:
    controller, _ = make()
    controller.open_instance(A)
    pages = alloc(controller, A, 5)
    assert pages == [0, 1, 2, 3, 4]
    assert controller.stats().num_free_pages == 11
    controller.free_pages(A, pages[:2])
    assert controller.stats().num_free_pages == 13
    assert alloc(controller, A, 0) == []
    assert alloc(controller, A, 1) == [5]  # virtual ids are never reused
    controller.close_instance(A)
    assert controller.stats().num_free_pages == 16


def test_try_allocate_takes_free_pages_only_and_never_waits(make: Make) -> None:
    """For room wanted ahead of need: pages that are free now, or none; never a demand that waits (or preempts),
    and never ahead of one that does."""
    controller, _ = make(num_pages=8)
    controller.open_instance(A)
    controller.open_instance(B)
    assert controller.try_allocate_pages(A, 6) == list(range(6))
    assert controller.try_allocate_pages(B, 3) == []  # 2 free
    waiting = controller.allocate_pages(B, 3)  # waits for a page
    assert not waiting.done()
    assert controller.try_allocate_pages(A, 1) == []  # free, but B waits first
    controller.free_pages(A, [5])
    assert waiting.result(timeout=0) == [0, 1, 2]
    assert controller.stats().num_free_pages == 0
    for instance in (A, B):
        controller.close_instance(instance)


def test_quota(make: Make) -> None:
    controller, _ = make(default_max_pages=4)
    controller.open_instance(A)
    controller.open_instance(B, max_pages=2)
    pages = alloc(controller, A, 3)
    with pytest.raises(ControlError, match="quota"):
        controller.allocate_pages(A, 2)
    with pytest.raises(ControlError, match="quota"):
        controller.share_pages(A, pages[:2])
    alloc(controller, B, 2)
    controller.export_pages(A, pages, "x")
    with pytest.raises(ControlError, match="quota"):
        controller.import_pages(B, "x")
    assert controller.stats().num_free_pages == 11  # nothing leaked by the failures
    controller.unexport_pages("x")
    controller.close_instance(A)
    controller.close_instance(B)


def test_forks_are_bounded_by_the_default_page_id_quota(make: Make) -> None:
    """A fork (share_pages) takes no physical page, only ids: without a quota of its own an instance may map
    DEFAULT_MAX_PAGE_IDS of them, then the share is refused and the instance goes on."""
    controller, _ = make()
    controller.open_instance(A)
    pages = alloc(controller, A, 16)  # the whole pool
    for _ in range(DEFAULT_MAX_PAGE_IDS // 16 - 1):
        controller.share_pages(A, pages)
    with pytest.raises(ControlError, match=f"page quota exceeded.*its limit is {DEFAULT_MAX_PAGE_IDS}"):
        controller.share_pages(A, pages[:1])
    controller.free_pages(A, pages)
    assert len(controller.share_pages(A, [pages[0] + 16])) == 1  # ids freed make room again
    controller.close_instance(A)


def test_invalid_arguments(make: Make) -> None:
    controller, _ = make(num_pages=4, page_size=4, max_context_len=8)
    controller.open_instance(A)
    with pytest.raises(ControlError, match="already open"):
        controller.open_instance(A)
    pages = alloc(controller, A, 3)
    page = pages[0]
    bad_calls = {
        "unknown instance": lambda: controller.allocate_pages(B, 1),
        "non-negative": lambda: controller.allocate_pages(A, -1),
        "would hold 5, the pool has 4": lambda: controller.allocate_pages(A, 2),
        "unknown page id 9": lambda: controller.free_pages(A, [page, 9]),
        "duplicate": lambda: controller.free_pages(A, [page, page]),
        "page size is 4": lambda: controller.mask_slots(A, page, [True]),
        "outside the page": lambda: controller.copy_slots(A, page, page, 3, 0, 2),
        "num_slots must be positive": lambda: controller.copy_slots(A, page, page, 0, 0, 0),
        "unknown page id 7": lambda: controller.share_pages(A, [7]),
        "non-empty name": lambda: controller.export_pages(A, [page], ""),
        "no pages are exported": lambda: controller.import_pages(A, "nope"),
        "no pages are exported ": lambda: controller.unexport_pages("nope"),
        "fill 2 pages": lambda: controller.prefix_publish(A, [1, 2, 3, 4, 5, 6, 7, 8, 9], [page]),
        "takes a VirtualForward": lambda: controller.forward(A, "tokens"),  # type: ignore[arg-type]
        "unknown instance 'b'": lambda: controller.close_instance(B),
        "unknown instance 'b' ": lambda: controller.prefix_lookup(B, [1, 2, 3, 4]),
        "unknown page id 8": lambda: controller.copy_slots(A, page, 8, 0, 0, 1),
        "unknown page id 6": lambda: controller.mask_slots(A, 6, [True] * 4),
        "unknown page id 5 ": lambda: controller.export_pages(A, [page, 5], "y"),
        "export at least one page": lambda: controller.export_pages(A, [], "y"),
        "max_pages must be positive": lambda: controller.open_instance(C, max_pages=0),
        "duplicate page ids": lambda: controller.share_pages(A, [page, page]),
    }
    forward_errors = {
        "one position per token": VirtualForward([1, 2], [0], [page], 2),
        ">= 1 token": VirtualForward([], [], [page], 1),
        "at least one page": VirtualForward([1], [0], [], 1),
        "last_page_len must be in": VirtualForward([1], [0], [page], 5),
        "do not fit": VirtualForward([1, 2, 3], [0, 1, 2], [page], 2),
        "output index 3": VirtualForward([1], [0], [page], 1, [OutputSpec(3, GREEDY)]),
        "attention_mask must be": VirtualForward([1], [0], [page], 2, (), [[True]]),
        "hides every slot": VirtualForward([1], [0], [page], 1, (), [[False]]),
        "token id 100": VirtualForward([100], [0], [page], 1),
        "token id -1": VirtualForward([-1], [0], [page], 1),
        "position -3": VirtualForward([1], [-3], [page], 1),
        "unknown page id 5": VirtualForward([1], [0], [5], 1),
        "duplicate page ids": VirtualForward([1], [0], [page, page], 1),
        "exceeds the maximum 8": VirtualForward([1], [0], pages, 1),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ControlError, match=message.strip()):
            call()
    for message, command in forward_errors.items():
        with pytest.raises(ControlError, match=message):
            controller.forward(A, command)
    assert not controller.step()  # nothing was queued by the failed calls
    assert controller.stats().num_free_pages == 1
    controller.free_pages(A, [page])
    with pytest.raises(ControlError, match="already freed"):
        controller.free_pages(A, [page])
    controller.close_instance(A)


def test_token_and_position_bounds(make: Make) -> None:
    controller, _ = make(vocab_size=10, max_position=8)
    controller.open_instance(A)
    [page] = alloc(controller, A, 1)
    with pytest.raises(ControlError, match=r"token id 10 out of range \[0, 10\)"):
        controller.forward(A, VirtualForward([10], [0], [page], 1))
    with pytest.raises(ControlError, match=r"position 8 out of range \[0, 8\)"):
        controller.forward(A, VirtualForward([1], [8], [page], 1))
    controller.close_instance(A)
    # Without a config, the bounds come from the executor's model_config (as the real Executor has).
    executor = FakeExecutor(num_pages=4)
    model = ModelConfig(vocab_size=50, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                        num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    executor.model_config = model  # type: ignore[attr-defined]
    controller = Controller(executor)
    controller.open_instance(A)
    [page] = alloc(controller, A, 1)
    with pytest.raises(ControlError, match=r"token id 50 out of range"):
        controller.forward(A, VirtualForward([50], [0], [page], 1))
    with pytest.raises(ControlError, match=r"position 64 out of range"):
        controller.forward(A, VirtualForward([1], [64], [page], 1))
    controller.close_instance(A)
    assert controller.stats().num_free_pages == 4


def test_fork_shares_pages_and_shared_pages_are_read_only(make: Make) -> None:
    controller, executor = make()
    controller.open_instance(A)
    pages = alloc(controller, A, 2)
    assert prefill(controller, A, [1, 2, 3, 4, 5, 6], pages) == 7
    free_before = controller.stats().num_free_pages
    forked = controller.share_pages(A, pages)
    assert len(forked) == 2 and set(forked).isdisjoint(pages)
    assert controller.stats().num_free_pages == free_before  # no new physical pages
    with pytest.raises(ControlError, match="shared"):  # the last page is now read-only for both
        controller.forward(A, VirtualForward([7], [6], pages, 3))
    with pytest.raises(ControlError, match="shared"):
        controller.copy_slots(A, pages[0], forked[1], 0, 0, 1)
    # The fork reads the shared prompt fine (writing into a private copy of the last page).
    [private] = alloc(controller, A, 1)
    controller.copy_slots(A, forked[1], private, 0, 0, 2)
    controller.free_pages(A, forked[1:])
    future = controller.forward(A, VirtualForward([7], [6], [forked[0], private], 3, [OutputSpec(0, GREEDY)]))
    while controller.step():
        pass
    assert future.result(timeout=0).outputs[0].token_id == 8
    assert executor.contexts[-1] == [1, 2, 3, 4, 5, 6, 7]
    controller.free_pages(A, pages)  # the fork's first page survives the original's free
    assert controller.stats().num_free_pages == 16 - 2
    controller.close_instance(A)


def test_export_import_unexport(make: Make) -> None:
    controller, executor = make()
    controller.open_instance(A)
    controller.open_instance(B)
    pages = alloc(controller, A, 2)
    prefill(controller, A, [1, 2, 3, 4, 5, 6, 7, 8], pages)
    controller.export_pages(A, pages, "prompt")
    with pytest.raises(ControlError, match="taken"):
        controller.export_pages(A, pages, "prompt")
    assert controller.list_exports() == ["prompt"]
    controller.close_instance(A)  # the export keeps the pages alive
    assert controller.stats().num_free_pages == 14
    imported = controller.import_pages(B, "prompt")
    [own] = alloc(controller, B, 1)
    future = controller.forward(B, VirtualForward([9], [8], imported + [own], 1, [OutputSpec(0, GREEDY)]))
    while controller.step():
        pass
    assert future.result(timeout=0).outputs[0].token_id == 10
    assert executor.contexts[-1] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    controller.unexport_pages("prompt")
    assert controller.list_exports() == [] and controller.stats().num_free_pages == 13  # B still holds them
    controller.close_instance(B)


def test_mask_slots_becomes_attention_mask(make: Make) -> None:
    controller, executor = make()
    controller.open_instance(A)
    pages = alloc(controller, A, 2)
    prefill(controller, A, [1, 2, 3, 4, 5], pages)
    controller.mask_slots(A, pages[0], [True, False, True, False])  # hide tokens 2 and 4
    future = controller.forward(A, VirtualForward([6, 7], [5, 6], pages, 3,
                                                  [OutputSpec(0, GREEDY), OutputSpec(1, GREEDY)]))
    controller.mask_slots(A, pages[0], [True] * 4)  # later masks do not change a queued forward
    while controller.step():
        pass
    assert [o.token_id for o in future.result(timeout=0).outputs] == [7, 8]
    command = executor.batches[-1].forwards[0]
    assert command.attention_mask == [[True, False, True, False, True, True, False],
                                      [True, False, True, False, True, True, True]]
    assert executor.contexts[-2:] == [[1, 3, 5, 6], [1, 3, 5, 6, 7]]
    # A user mask is ANDed with the hidden slots; with everything visible, no mask is sent.
    controller.mask_slots(A, pages[1], [False, True, True, True])
    future = controller.forward(A, VirtualForward([8], [7], pages, 4, [OutputSpec(0, GREEDY)],
                                                  [[True, True, True, True, True, False, True, True]]))
    while controller.step():
        pass
    assert executor.contexts[-1] == [1, 2, 3, 4, 7, 8]
    controller.mask_slots(A, pages[1], [True] * 4)
    controller.forward(A, VirtualForward([9], [8], pages + alloc(controller, A, 1), 1))
    while controller.step():
        pass
    assert executor.batches[-1].forwards[0].attention_mask is None
    controller.close_instance(A)


def test_forked_pages_keep_their_mask(make: Make) -> None:
    controller, _ = make()
    controller.open_instance(A)
    [page] = alloc(controller, A, 1)
    controller.mask_slots(A, page, [False, True, True, True])
    [fork] = controller.share_pages(A, [page])
    assert controller.state.instances[A].table.visibility(fork) == [False, True, True, True]
    controller.close_instance(A)


def test_pages_used_by_queued_commands(make: Make) -> None:
    """Written pages cannot be shared while queued; freed pages live on until the queued command ran."""
    controller, executor = make()
    controller.open_instance(A)
    pages = alloc(controller, A, 2)
    future = controller.forward(A, VirtualForward([1, 2], [0, 1], pages[:1], 2, [OutputSpec(1, GREEDY)]))
    with pytest.raises(ControlError, match="being written"):
        controller.share_pages(A, pages[:1])
    with pytest.raises(ControlError, match="being written"):
        controller.export_pages(A, pages[:1], "x")
    controller.free_pages(A, pages)
    with pytest.raises(ControlError, match="already freed"):
        controller.forward(A, VirtualForward([3], [2], pages[:1], 3))
    assert controller.stats().num_free_pages == 15  # the queued forward still holds its page
    assert controller.step()
    assert future.result(timeout=0).outputs[0].token_id == 3 and executor.contexts[-1] == [1, 2]
    assert controller.stats().num_free_pages == 16
    controller.close_instance(A)


def test_prefix_cache_lookup_publish_and_stats(make: Make) -> None:
    controller, executor = make(num_pages=8)
    controller.open_instance(A)
    prompt = list(range(1, 11))  # 2 full pages + 2 tokens
    pages = alloc(controller, A, 3)
    prefill(controller, A, prompt, pages)
    controller.prefix_publish(A, prompt, pages)  # the partial last page is ignored
    assert controller.num_cached_pages == 2
    controller.close_instance(A)
    assert controller.stats().num_free_pages == 8  # cache-only pages count as free (evictable)
    assert controller.state.res.pool.num_free_pages == 6
    controller.open_instance(B)
    hit, num_tokens = controller.prefix_lookup(B, prompt + [11])
    assert num_tokens == 8 and len(hit) == 2
    assert controller.prefix_lookup(B, [5, 5, 5, 5]) == ([], 0)
    [tail] = alloc(controller, B, 1)
    future = controller.forward(B, VirtualForward([9, 10, 11], [8, 9, 10], hit + [tail], 3,
                                                  [OutputSpec(2, GREEDY)]))
    while controller.step():
        pass
    assert future.result(timeout=0).outputs[0].token_id == 12
    assert executor.contexts[-1] == prompt + [11]
    stats = controller.stats()
    assert (stats.num_prefix_queries, stats.num_prefix_hit_tokens, stats.num_prefix_query_tokens) == (2, 8, 15)
    controller.close_instance(B)


def test_allocation_evicts_cache_only_pages(make: Make) -> None:
    controller, _ = make(num_pages=4)
    controller.open_instance(A)
    pages = alloc(controller, A, 2)
    prefill(controller, A, list(range(8)), pages)
    controller.prefix_publish(A, list(range(8)), pages)
    controller.free_pages(A, pages)
    assert controller.num_cached_pages == 2
    assert len(alloc(controller, A, 3)) == 3  # 2 free + 1 evicted (the leaf of the chain)
    assert controller.num_cached_pages == 1
    controller.open_instance(B)
    assert controller.prefix_lookup(B, list(range(8))) == ([0], 4)  # the root survived
    controller.close_instance(A)
    controller.close_instance(B)


def test_prefix_lookup_respects_quota(make: Make) -> None:
    controller, _ = make()
    controller.open_instance(A)
    pages = alloc(controller, A, 2)
    prefill(controller, A, list(range(8)), pages)
    controller.prefix_publish(A, list(range(8)), pages)
    controller.open_instance(B, max_pages=1)
    assert controller.prefix_lookup(B, list(range(8)))[1] == 4
    controller.close_instance(A)
    controller.close_instance(B)


def test_cancelled_allocation_is_skipped(make: Make) -> None:
    controller, _ = make(num_pages=2)
    controller.open_instance(A)
    controller.open_instance(B)
    held = alloc(controller, A, 1)
    alloc(controller, B, 1)
    cancelled = controller.allocate_pages(A, 1)
    waiting = controller.allocate_pages(B, 1)
    assert cancelled.cancel()
    controller.free_pages(A, held)
    assert waiting.result(timeout=0) == [1] and controller.stats().num_free_pages == 0
    controller.close_instance(A)
    controller.close_instance(B)


def test_stats_counts_instances_running_and_waiting(make: Make) -> None:
    controller, _ = make(num_pages=2)
    controller.open_instance(A)
    controller.open_instance(B)
    pages = alloc(controller, A, 2)
    controller.forward(A, VirtualForward([1], [0], pages[:1], 1))
    controller.allocate_pages(B, 1)
    stats = controller.stats()
    assert (stats.num_instances, stats.num_running, stats.num_waiting, stats.num_swapped) == (2, 1, 1, 0)
    controller.step()
    assert controller.stats().num_running == 0
    controller.close_instance(A)
    controller.close_instance(B)
    assert not controller.step()
    controller.stop()  # never started: fine


def test_control_config_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ControlConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="vocab_size"):
        ControlConfig(vocab_size=0)
    model = ModelConfig(vocab_size=50, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                        num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    config = ControlConfig.for_engine(EngineConfig(max_batch_tokens=512, max_batch_size=8), model,
                                      decode_max_tokens=2)
    assert (config.max_batch_tokens, config.max_batch_size, config.vocab_size, config.max_position,
            config.decode_max_tokens) == (512, 8, 50, 64, 2)

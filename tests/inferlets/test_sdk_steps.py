"""pie_sdk's step-level calls against the fake host (tests/inferlets/fake_host.py): batched steps over several
contexts in one host call, rewinding to ask a position again (copy on write into shared pages), speculative
verification of a draft, and page usage. Fast; no Wasm build."""
from __future__ import annotations

from types import ModuleType

import pytest

from tests.inferlets.fake_host import PAGE_SIZE, VOCAB_SIZE, FakeHost, load_sdk, next_token, reference_generation

PROMPT = "The quick brown"  # 15 tokens: 3 full pages + 3 slots
PROMPTS = ("The quick brown", "Hello there", "A")


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return load_sdk(tmp_path_factory.mktemp("bindings"))


@pytest.fixture
def host(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost()
    fake.install(monkeypatch)
    sdk.model_info.cache_clear()
    return fake


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def _contexts(sdk: ModuleType, prompts: tuple[str, ...] = PROMPTS) -> list:
    contexts = []
    for prompt in prompts:
        ctx = sdk.Context()
        ctx.fill(prompt)
        contexts.append(ctx)
    return contexts


def test_batched_steps_equal_single_steps_with_one_host_call_each(sdk: ModuleType, host: FakeHost) -> None:
    contexts = _contexts(sdk)
    steps = [sdk.decode_step_all(contexts) for _ in range(6)]
    for i, prompt in enumerate(PROMPTS):
        assert [step[i] for step in steps] == reference_generation(_ids(prompt), 6)
    assert host.calls.count("forward_all") == 6 and "forward" not in host.calls
    assert host.calls.count("allocate") <= 6  # the pages a step needs come in one allocation
    assert all(len(ctx.page_ids) == -(-ctx.kv_len // PAGE_SIZE) for ctx in contexts)
    by_distribution = _contexts(sdk)
    chosen: list[list[int]] = [[] for _ in PROMPTS]
    for _ in range(6):
        for i, (ctx, [(token_id, _)]) in enumerate(zip(by_distribution, sdk.next_distribution_all(by_distribution, 1))):
            assert ctx.pending_ids == []
            ctx.append(token_id)
            chosen[i].append(token_id)
    assert chosen == [reference_generation(_ids(p), 6) for p in PROMPTS]


def test_a_refused_pass_leaves_only_its_context_as_it_was(sdk: ModuleType, host: FakeHost) -> None:
    failing, other = _contexts(sdk, PROMPTS[:2])
    host.fail_forward = "boom"  # the first request of the next forward-all
    with pytest.raises(sdk.PieError, match="context 0: boom"):
        sdk.decode_step_all([failing, other])
    assert failing.kv_len == 0 and failing.page_ids == [] and failing.pending_ids == _ids(PROMPTS[0])
    assert other.token_ids[-1] == reference_generation(_ids(PROMPTS[1]), 1)[0] and len(other.pending_ids) == 1
    assert host.num_used_pages == len(other.page_ids)
    assert sdk.decode_step_all([failing, other]) == [reference_generation(_ids(PROMPTS[0]), 1)[0],
                                                     reference_generation(_ids(PROMPTS[1]), 2)[1]]
    with pytest.raises(ValueError, match="twice"):
        sdk.decode_step_all([other, other])


def test_rewind_asks_the_same_position_again(sdk: ModuleType, host: FakeHost) -> None:
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    [(first, _)] = ctx.next_distribution(1)
    assert ctx.pending_ids == [] and ctx.kv_len == len(PROMPT)
    ctx.rewind()
    assert ctx.pending_ids == _ids(PROMPT[-1]) and ctx.kv_len == len(PROMPT) - 1
    assert len(ctx.next_distribution(VOCAB_SIZE)) == 1  # any k up to the vocabulary (the fake returns one)
    ctx.rewind()
    assert ctx.decode_step(allowed_token_ids=[first]) == first  # followed by a masked step
    assert [ctx.decode_step() for _ in range(5)] == reference_generation(_ids(PROMPT), 6)[1:]
    with pytest.raises(ValueError, match="rewind"):
        ctx.rewind(ctx.kv_len + 1)
    with pytest.raises(ValueError, match="vocabulary"):
        ctx.next_distribution(VOCAB_SIZE + 1)


def test_rewind_into_a_shared_page_writes_a_private_copy(sdk: ModuleType, host: FakeHost) -> None:
    parent = sdk.Context()
    parent.fill(PROMPT)
    parent.decode_step()  # kv_len 15: pages 0-2 full, page 3 holds 3 slots
    child = parent.fork()
    shared = [host.table[p] for p in child.page_ids[:3]]
    assert all(host.refcounts[p] == 2 for p in shared)
    parent.rewind(6)  # back to slot 9: page 2 (shared) keeps slots 0..0 and is written next
    assert len(parent.page_ids) == 3 and host.table[parent.page_ids[2]] != shared[2]
    assert host.table[parent.page_ids[1]] == shared[1] and host.refcounts[shared[2]] == 1
    assert parent.page_usage() == sdk.PageUsage(num_page_ids=3, num_physical_pages=3, num_shared_pages=2)
    expected = reference_generation(_ids(PROMPT), 8)
    assert [parent.decode_step() for _ in range(7)] == expected[1:]
    assert [child.decode_step() for _ in range(7)] == expected[1:]  # the child's pages were not touched
    for ctx in (parent, child):
        ctx.release()
    assert host.num_used_pages == 0


def test_decode_draft_keeps_the_agreeing_prefix_in_one_pass(sdk: ModuleType, host: FakeHost) -> None:
    expected = reference_generation(_ids(PROMPT), 12)
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    wrong = (expected[3] + 1) % VOCAB_SIZE
    assert ctx.decode_draft(expected[:3] + [wrong, 65, 66]) == expected[:4]
    assert host.calls.count("forward") == 1
    assert ctx.kv_len == len(PROMPT) + 3 and ctx.pending_ids == [expected[3]]
    assert ctx.decode_draft(expected[4:8]) == expected[4:9]  # all kept, plus the token after them
    assert ctx.decode_draft([]) == expected[9:10]  # an empty draft is a decode step
    assert [ctx.decode_step() for _ in range(2)] == expected[10:12]  # the dropped slots are never read
    assert ctx.token_ids == _ids(PROMPT) + expected
    assert host.calls.count("forward") == 5
    with pytest.raises(ValueError, match="seed"):
        ctx.decode_draft([1], sdk.Sampler(temperature=1.0, seed=3))


def test_page_usage_counts_shared_pages_once(sdk: ModuleType, host: FakeHost) -> None:
    parent = sdk.Context()
    parent.fill(PROMPT)
    children = [parent.fork() for _ in range(2)]  # the 14 flushed tokens: 3 full pages + 2 slots
    usage = sdk.page_usage()
    assert usage == sdk.PageUsage(num_page_ids=12, num_physical_pages=6, num_shared_pages=3)
    assert usage.num_physical_pages == host.num_used_pages
    assert children[0].page_usage() == sdk.PageUsage(num_page_ids=4, num_physical_pages=4, num_shared_pages=3)
    for child in children:
        child.release()
    assert parent.page_usage() == sdk.PageUsage(num_page_ids=4, num_physical_pages=4, num_shared_pages=0)
    assert next_token(_ids(PROMPT)) == parent.decode_step()


def test_a_context_whose_kv_was_evicted_computes_it_again_and_goes_on(sdk: ModuleType, host: FakeHost) -> None:
    """The server's last resort of preemption drops every page of the instance (its calls then fail with
    "KV evicted ..."): the next step computes the whole context again, in the same pass, and continues as if
    nothing happened."""
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    steps = [ctx.decode_step() for _ in range(3)]
    host.table.clear(), host.refcounts.clear(), host.slots.clear()  # the eviction: every page gone
    host.fail_forward = "KV evicted: page 100 was dropped when the instance was preempted without swap space"
    steps.append(ctx.decode_step())
    assert steps == reference_generation(_ids(PROMPT), 4)
    assert ctx.kv_len == len(PROMPT) + 3 and ctx.pending_ids == steps[-1:]
    assert host.num_used_pages == len(ctx.page_ids) == -(-ctx.kv_len // PAGE_SIZE)
    assert ctx.decode_step() == reference_generation(_ids(PROMPT), 5)[-1]
    host.fail_forward = "boom"  # any other refusal is the caller's, as before
    with pytest.raises(sdk.HostError, match="boom"):
        ctx.decode_step()

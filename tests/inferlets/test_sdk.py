"""pie_sdk's logic in plain CPython against a fake host (tests/inferlets/fake_host.py): page accounting,
laziness, fork sharing, rollback on errors, stop rules, the entry wrapper. Fast; no Wasm build."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.inferlets.fake_host import EOS, PAGE_SIZE, FakeHost, load_sdk, reference_generation

PROMPT = "The quick brown"  # 15 tokens: 3 full pages + 3 slots


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


def _text(token_ids: Any) -> str:
    return "".join(chr(t) for t in token_ids)


def test_generate_matches_the_model_and_streams_its_text(sdk: ModuleType, host: FakeHost) -> None:
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    assert host.calls == []  # fill is lazy
    gen = ctx.generate_detailed(12)
    expected = reference_generation(_ids(PROMPT), 12)
    assert list(gen.token_ids) == expected and gen.text == _text(expected)
    assert gen.finish_reason == "length"
    assert "".join(text for _, text in host.sent) == gen.text
    assert host.calls.count("generate") == 1 and "forward" not in host.calls
    assert ctx.kv_len == len(PROMPT) + 11 and ctx.pending_ids == [expected[-1]]
    assert len(ctx.page_ids) == -(-ctx.kv_len // PAGE_SIZE)


def test_generate_continues_where_it_stopped(sdk: ModuleType, host: FakeHost) -> None:
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    first = ctx.generate(5, stream=False)
    second = ctx.generate(7, stream=False)
    assert first + second == _text(reference_generation(_ids(PROMPT), 12))
    assert host.sent == []


def test_fine_grained_paths_agree_with_generate(sdk: ModuleType, host: FakeHost) -> None:
    expected = reference_generation(_ids(PROMPT), 9)
    stepwise = sdk.Context()
    stepwise.fill(PROMPT)
    gen = stepwise.generate_stepwise(9, stream=2)
    assert list(gen.token_ids) == expected and gen.text == _text(expected)
    assert "".join(t for ch, t in host.sent if ch == 2) == gen.text
    by_steps = sdk.Context()
    by_steps.fill(PROMPT)
    assert [by_steps.decode_step() for _ in range(9)] == expected
    by_distribution = sdk.Context()
    by_distribution.fill(PROMPT)
    chosen = []
    for _ in range(9):
        [(token_id, prob)] = by_distribution.next_distribution(1)
        assert prob == pytest.approx(0.9)
        by_distribution.append(token_id)
        chosen.append(token_id)
    assert chosen == expected


def test_fork_shares_full_pages_and_copies_the_partial_one(sdk: ModuleType, host: FakeHost) -> None:
    parent = sdk.Context()
    parent.fill(PROMPT)
    parent.generate(3, stream=False)  # kv_len = 15 + 2 = 17: 4 full pages + 1 slot
    assert parent.kv_len == 17 and host.num_used_pages == 5
    child = parent.fork()
    assert host.num_used_pages == 6  # 4 shared + the parent's partial + the child's copy (not 10)
    shared = [host.table[p] for p in parent.page_ids[:4]]
    assert shared == [host.table[p] for p in child.page_ids[:4]]
    assert all(host.refcounts[p] == 2 for p in shared)
    assert host.table[parent.page_ids[4]] != host.table[child.page_ids[4]]
    expected = reference_generation(_ids(PROMPT), 3 + 10)[3:]
    assert child.generate(10, stream=False) == _text(expected)
    assert parent.generate(10, stream=False) == _text(expected)  # the parent still writes its own page
    grandchild = child.fork()
    for ctx in (parent, child, grandchild):
        ctx.release()
    assert host.num_used_pages == 0 and host.table == {}


def test_fork_after_fill_flushes_the_shared_prefix_once(sdk: ModuleType, host: FakeHost) -> None:
    parent = sdk.Context()
    parent.fill(PROMPT)
    children = [parent.fork() for _ in range(3)]
    assert host.calls.count("forward") == 1  # the prompt's KV is computed once, before the first fork
    assert parent.pending_ids == [ord(PROMPT[-1])] and parent.kv_len == len(PROMPT) - 1
    gens = sdk.generate_all(children, 6)
    assert {g.text for g in gens} == {_text(reference_generation(_ids(PROMPT), 6))}


def test_a_failed_forward_changes_nothing(sdk: ModuleType, host: FakeHost) -> None:
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    host.fail_forward = "boom"
    with pytest.raises(sdk.HostError, match="boom"):
        ctx.decode_step()
    assert host.num_used_pages == 0 and ctx.page_ids == [] and ctx.kv_len == 0
    assert len(ctx.pending_ids) == len(PROMPT)
    assert ctx.decode_step() == reference_generation(_ids(PROMPT), 1)[0]


def test_stop_strings_and_tokens_end_both_paths_alike(sdk: ModuleType, host: FakeHost) -> None:
    expected = _text(reference_generation(_ids(PROMPT), 20))
    stop = expected[5:7]  # spans two tokens
    for method in ("generate_detailed", "generate_stepwise"):
        host.sent.clear()
        ctx = sdk.Context()
        ctx.fill(PROMPT)
        gen = getattr(ctx, method)(20, stop=[stop, "not-there"])
        cut = expected.index(stop)
        assert (gen.text, gen.finish_reason) == (expected[:cut], "stop"), method
        assert "".join(t for _, t in host.sent) == gen.text, method
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    gen = ctx.generate_stepwise(20, stop_token_ids=[ord(expected[3])], stream=False)
    assert gen.text == expected[:3] and gen.finish_reason == "stop"
    tracker = sdk.StopTracker(sdk.StopCondition(max_tokens=5), eos_token_ids=[EOS])
    assert tracker.add(EOS, "\n") == "" and tracker.finish_reason == "stop" and tracker.text == ""


def test_prefix_cache_reuses_full_pages(sdk: ModuleType, host: FakeHost) -> None:
    first = sdk.Context()
    first.fill(PROMPT)
    text = first.generate(4, stream=False)
    assert sdk.publish_prefix(first) == 16  # 15 + 3 tokens in KV: 4 full pages of 4
    second = sdk.Context()
    assert sdk.fill_cached(second, PROMPT) == 12  # page-aligned prefix of the 15 prompt tokens
    assert second.pending_ids == _ids(PROMPT[12:])
    assert second.generate(4, stream=False) == text
    exact = sdk.Context()
    assert sdk.fill_cached(exact, first.token_ids[:16]) == 12  # the last token stays pending
    with pytest.raises(sdk.PieError, match="empty context"):
        sdk.fill_cached(exact, PROMPT)


def test_export_and_import_continue_the_same_sequence(sdk: ModuleType, host: FakeHost) -> None:
    owner = sdk.Context()
    owner.fill(PROMPT)
    assert sdk.export_context(owner, "doc") == 12
    guest = sdk.import_context("doc")
    assert guest.kv_len == 12 and guest.pending_ids == _ids(PROMPT[12:])
    expected = _text(reference_generation(_ids(PROMPT), 6))
    assert guest.generate(6, stream=False) == expected
    assert owner.generate(6, stream=False) == expected
    with pytest.raises(sdk.PieError, match="no context was exported"):
        sdk.import_context("missing")


def test_bad_input_gets_clear_errors(sdk: ModuleType, host: FakeHost) -> None:
    ctx = sdk.Context()
    with pytest.raises(sdk.PieError, match="fill"):
        ctx.generate(4)
    with pytest.raises(ValueError, match="out of range"):
        ctx.fill([1, 500])
    assert ctx.token_ids == []
    ctx.fill("x")
    with pytest.raises(ValueError, match="max_tokens"):
        ctx.generate(0)
    with pytest.raises(sdk.PieError, match="limit"):
        ctx.fill("y" * 600)
        ctx.generate(4)
    with pytest.raises(ValueError, match="top_p"):
        sdk.Sampler(top_p=0.0)
    with pytest.raises(ValueError, match="temperature 0"):
        sdk.Greedy(temperature=0.5)
    with pytest.raises(ValueError, match="empty"):
        sdk.StopCondition(stop_strings=("",))
    assert host.num_used_pages == 0


def test_sampler_sends_history_only_when_a_penalty_needs_it(sdk: ModuleType) -> None:
    plain = sdk.Sampler(temperature=0.7, top_k=5, seed=3).to_wit([1, 2], [3])
    assert (plain.prompt_token_ids, plain.output_token_ids, plain.top_k, plain.seed) == ([], [], 5, 3)
    penalised = sdk.Sampler(repetition_penalty=1.2, logit_bias={7: -1.0}).to_wit([1, 2], [3])
    assert (penalised.prompt_token_ids, penalised.output_token_ids) == ([1, 2], [3])
    assert penalised.logit_bias == [(7, -1.0)]


def test_generate_all_gives_each_context_its_own_seed(sdk: ModuleType, host: FakeHost,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seeds: list[int | None] = []
    real_generate = host.generate

    def recording(request: Any) -> Any:
        seeds.append(request.sampling.seed)
        return real_generate(request)

    monkeypatch.setattr(host, "generate", recording)
    parent = sdk.Context()
    parent.fill(PROMPT)
    sdk.generate_all([parent.fork() for _ in range(3)], 4, sampler=sdk.Sampler(seed=2 ** 64 - 2))
    sdk.generate_all([parent.fork(), parent.fork()], 4, sampler=sdk.Greedy())
    assert seeds == [2 ** 64 - 2, 2 ** 64 - 1, 0, None, None]


def test_constraints_reach_the_host_as_wit_variants(sdk: ModuleType, host: FakeHost,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from wit_world.imports import generate
    seen: list[Any] = []
    monkeypatch.setattr(generate, "generate", lambda request: seen.append(request.constraint) or host.generate(request))
    for constraint in (sdk.JsonSchema({"type": "object"}), sdk.Regex("[0-9]+"), sdk.AllowedTokens((97, 98)), None):
        ctx = sdk.Context()
        ctx.fill(PROMPT)
        ctx.generate(2, constraint=constraint, stream=False)
    assert seen == [generate.Constraint_JsonSchema('{"type": "object"}'), generate.Constraint_Regex("[0-9]+"),
                    generate.Constraint_AllowedTokens([97, 98]), None]
    with pytest.raises(ValueError):
        sdk.JsonSchema("{not json")
    with pytest.raises(ValueError, match="at least one"):
        sdk.AllowedTokens(())
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    with pytest.raises(TypeError, match="not a constraint"):
        ctx.generate(2, constraint="[0-9]+")  # type: ignore[arg-type]
    assert ctx.pending_ids == [ord(c) for c in PROMPT]  # nothing happened


def _run(sdk: ModuleType, main: Any) -> str | None:
    from componentize_py_types import Err
    try:
        sdk.export(main)().run()
    except Err as err:
        return str(err.value)
    return None


def test_entry_turns_main_outcomes_into_run_results(sdk: ModuleType, host: FakeHost) -> None:
    host.arguments = ["--n", "3"]
    seen: list[list[str]] = []
    assert _run(sdk, seen.append) is None and seen == [["--n", "3"]]

    def fails(args: list[str]) -> None:
        raise ValueError("bad prompt")

    error = _run(sdk, fails)
    assert error is not None and error.startswith("ValueError: bad prompt") and "Traceback" in error

    def exits(code: int) -> Any:
        def main(args: list[str]) -> None:
            raise SystemExit(code)
        return main

    def raw_call_fails(args: list[str]) -> None:
        from componentize_py_types import Err
        raise Err("unknown page ids [7]")

    assert _run(sdk, raw_call_fails).startswith("HostError: unknown page ids [7]\nTraceback")
    assert _run(sdk, exits(0)) is None
    assert _run(sdk, exits(3)) == "exit status 3"


def test_prepare_runs_first_only_in_an_instance_started_ahead(sdk: ModuleType, host: FakeHost,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    host.arguments = ["--n", "3"]
    calls: list[str] = []

    def prepare() -> None:
        calls.append("prepare")

    def main(args: list[str]) -> None:
        calls.append(f"main {args}")

    sdk.export(main, prepare)().run()
    assert calls == ["main ['--n', '3']"]  # launched as usual: no prepare
    host.started_ahead, calls[:] = True, []
    sdk.export(main, prepare)().run()
    assert calls == ["prepare", "main ['--n', '3']"]

    def broken() -> None:
        raise ValueError("no model info")

    calls[:] = []
    sdk.export(main, broken)().run()  # an optimisation that failed: the request is served all the same
    assert calls == ["main ['--n', '3']"] and "ValueError: no model info" in capsys.readouterr().err
    with pytest.raises(TypeError, match="prepare must be callable"):
        sdk.export(main, "prepare")


def test_argument_parser_reports_usage_and_sends_help(sdk: ModuleType, host: FakeHost) -> None:
    def main(args: list[str]) -> None:
        parser = sdk.ArgumentParser(prog="demo")
        parser.add_argument("--max-tokens", type=int, required=True)
        parser.parse_args(args)

    host.arguments = ["--max-tokens", "many"]
    error = _run(sdk, main)
    assert error is not None and "usage: demo" in error and "invalid int value: 'many'" in error
    host.arguments = ["--help"]
    assert _run(sdk, main) is None
    assert "usage: demo" in host.sent[0][1] and "--max-tokens" in host.sent[0][1]



def test_help_is_plain_text_of_78_columns_whatever_the_environment_says(
        sdk: ModuleType, host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """An inferlet has no terminal: the parser asks nothing of the environment (argparse would, for every
    add_argument) and wraps help at argparse's own no-terminal width."""
    import argparse

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("FORCE_COLOR", "1")
    long_help = "a sentence that keeps going " * 8
    host.arguments = ["--help"]

    def main(args: list[str]) -> None:
        parser = sdk.ArgumentParser(prog="demo")
        parser.add_argument("--count", type=int, help=long_help)
        parser.parse_args(args)

    assert _run(sdk, main) is None
    text = host.sent[-1][1]
    assert "\x1b[" not in text and max(map(len, text.splitlines())) <= sdk.runtime.HELP_WIDTH < 200
    assert len(text.splitlines()) > 4  # the long help was wrapped
    raw = sdk.ArgumentParser(prog="demo", formatter_class=argparse.RawTextHelpFormatter)
    raw.add_argument("--count", help=long_help)
    assert long_help.strip() in raw.format_help()  # a formatter the author chose is kept


def test_a_generation_cut_by_an_eviction_goes_on_as_if_whole(sdk: ModuleType, host: FakeHost) -> None:
    """The server drops the instance's KV after 4 of 12 tokens (finish reason "evicted", no pages): generate
    computes the context again and decodes the 8 left; the result, the stream and the state are as without it."""
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    host.evict_after = 4
    gen = ctx.generate_detailed(12)
    expected = reference_generation(_ids(PROMPT), 12)
    assert list(gen.token_ids) == expected and gen.finish_reason == "length"
    assert "".join(text for _, text in host.sent) == gen.text == _text(expected)  # streamed once, nothing twice
    assert host.calls.count("generate") == 2 and ctx.token_ids == _ids(PROMPT) + expected
    assert ctx.kv_len == len(PROMPT) + 11 and ctx.pending_ids == [expected[-1]]
    assert host.num_used_pages == len(ctx.page_ids) == -(-ctx.kv_len // PAGE_SIZE)


def test_a_grammar_generation_cut_by_an_eviction_starts_over_unless_streamed(sdk: ModuleType,
                                                                             host: FakeHost) -> None:
    """A grammar's state cannot be resumed: a generation under one starts over with its cut tokens dropped (the
    fake host ignores the grammar, so the output is the plain greedy one), or fails if it streamed already."""
    ctx = sdk.Context()
    ctx.fill(PROMPT)
    host.evict_after = 3
    gen = ctx.generate_detailed(8, constraint=sdk.Regex("[a-z ]{8}"), stream=False)
    expected = reference_generation(_ids(PROMPT), 8)
    assert list(gen.token_ids) == expected and ctx.token_ids == _ids(PROMPT) + expected
    assert host.calls.count("generate") == 2 and ctx.kv_len == len(PROMPT) + 7
    streamed = sdk.Context()
    streamed.fill(PROMPT)
    host.evict_after = 3
    with pytest.raises(sdk.PieError, match="KV evicted in a streamed grammar-constrained generation"):
        streamed.generate(8, constraint=sdk.Regex("[a-z ]{8}"))


def test_generate_all_goes_on_for_the_contexts_an_eviction_cut(sdk: ModuleType, host: FakeHost) -> None:
    contexts = [sdk.Context() for _ in range(2)]
    for ctx, prompt in zip(contexts, (PROMPT, "Hello there")):
        ctx.fill(prompt)
    host.evict_after = 5  # the first context's generation is cut (the fake drops every page of the instance)
    gens = sdk.generate_all(contexts, 9)
    assert [list(g.token_ids) for g in gens] == [reference_generation(_ids(p), 9) for p in (PROMPT, "Hello there")]
    assert all(g.finish_reason == "length" for g in gens)


def test_short_texts_are_encoded_by_the_host_once(sdk: ModuleType, host: FakeHost,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    texts: list[str] = []
    monkeypatch.setattr(sdk.tokenizer.tokenize, "encode", lambda text: texts.append(text) or _ids(text))
    monkeypatch.setattr(sdk.tokenizer, "_memo", {})
    key = '", "input": "'
    first = sdk.encode(key)
    first.append(0)  # the caller owns what it gets: the memo is not changed through it
    assert sdk.encode(key) == sdk.encode(key) == _ids(key)
    long_text = "x" * (sdk.tokenizer.MAX_MEMO_CHARS + 1)
    assert sdk.encode(long_text) == sdk.encode(long_text) == _ids(long_text)
    assert texts == [key, long_text, long_text]
    ctx = sdk.Context()
    ctx.fill(key)
    assert ctx.token_ids == _ids(key) and texts[-1] == long_text, "fill used the memo"

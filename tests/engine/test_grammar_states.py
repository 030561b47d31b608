"""Regex masks kept by DFA state (engine/grammar_states.py): a cached mask is the one llguidance computes for
that matcher itself, along random walks of many matchers; regexes outside the shared dialect stay uncached."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import interegular.fsm
import pytest

from pie_server.engine import grammar as grammar_module
from pie_server.engine import grammar_states
from pie_server.engine.grammar import MIN_POOLED_MASKS, GrammarCompiler, GrammarMatcher, GrammarSpec, fill_masks
from pie_server.engine.grammar_states import MaskCache, RegexStates
from pie_server.engine.tokenizer import Tokenizer

from tests.engine.test_grammar import allowed_ids

PATTERNS = [
    "[a-z ]{16}",                      # react-agent's uniform values
    "(search|calculate)",              # a tool name
    '[^"\\\\\\x00-\\x1f]{0,12}"',      # a free string value closed by its quote (non-ASCII: partial characters)
    "(yes|no|maybe)( [0-9]{1,3})?",
    "[A-Z][a-z]+(, [A-Z][a-z]+)*",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama_dir)


def make_compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.token_bytes(), tokenizer.vocab_size, sorted(tokenizer.eos_token_ids),
                           tokenizer.bos_token_id, tokenizer.encode)


def built_regex(compiler: GrammarCompiler, pattern: str) -> GrammarMatcher:
    """A matcher of pattern once its DFA is built (the build runs in a thread of its own)."""
    assert compiler._masks.build(pattern).result(timeout=30) is not None
    return compiler.regex(pattern)


def uncached_mask(compiler: GrammarCompiler, pattern: str, token_ids: list[int]) -> bytes:
    """What llguidance alone gives after token_ids: a matcher of a fresh cache that replays them."""
    fresh = GrammarCompiler(compiler._token_bytes, compiler._vocab_size, compiler._eos_token_ids,
                            compiler._bos_token_id, compiler._encode)
    fresh._tokenizer, fresh._pristine = compiler._tokenizer, compiler._pristine  # same grammars, empty mask cache
    return fresh.matcher(GrammarSpec("regex", pattern, tuple(token_ids))).allowed_token_mask()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_masks_equal_llguidance_own(tokenizer: Tokenizer, pattern: str) -> None:
    compiler = make_compiler(tokenizer)
    eos = set(tokenizer.eos_token_ids)
    rng = random.Random(pattern)
    num_hits = 0
    for _ in range(12):  # walks through one cache: later walks meet the states of earlier ones
        matcher, token_ids = built_regex(compiler, pattern), []
        for _ in range(40):
            hit = matcher.cached_mask() is not None
            mask = matcher.allowed_token_mask()
            if hit:
                num_hits += 1
                assert mask == uncached_mask(compiler, pattern, token_ids), (pattern, token_ids)
            choices = [t for t in allowed_ids(matcher) if t not in eos]
            if not choices:
                break
            token_ids.append(rng.choice(choices))
            matcher.accept(token_ids[-1])
            if matcher.stopped:
                break
    assert num_hits >= 10  # the walks did meet cached states


def test_matchers_of_one_state_share_one_mask(tokenizer: Tokenizer) -> None:
    compiler = make_compiler(tokenizer)
    first, second = built_regex(compiler, "[a-z ]{16}"), compiler.regex("[a-z ]{16}")
    first.accept_all(tokenizer.encode("ab cd"))
    second.accept_all(tokenizer.encode("xy zw"))  # other letters, same length: the same DFA state
    assert first.cached_mask() is None
    masks = fill_masks([first, second])
    assert masks[0] == masks[1] and len(compiler._masks) == 1
    third = compiler.regex("[a-z ]{16}")
    third.accept_all(tokenizer.encode("qrstu"))
    assert third.cached_mask() == masks[0]


def test_a_step_computes_each_uncached_state_once_and_caches_it(tokenizer: Tokenizer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = make_compiler(tokenizer)
    num_states = MIN_POOLED_MASKS  # enough distinct states for llguidance's pool
    matchers = [built_regex(compiler, "[a-z ]{16}") for _ in range(2 * num_states)]
    for i, matcher in enumerate(matchers):  # states 0 ... num_states - 1 letters in, two matchers each
        matcher.accept_all(tokenizer.encode("a b c d e f g h i j k l m n o p"[:i % num_states]))
    pooled: list[int] = []
    real_pooled = grammar_module.fill_masks_pooled
    monkeypatch.setattr(grammar_module, "fill_masks_pooled", lambda ms: pooled.append(len(ms)) or real_pooled(ms))
    masks = fill_masks(matchers)
    assert pooled == [num_states]  # one computation per state, in the pool
    assert masks[:num_states] == masks[num_states:] and len(set(masks)) == num_states
    assert len(compiler._masks) == num_states
    assert [m.cached_mask() for m in matchers] == masks


def test_half_a_character_is_not_a_state(tokenizer: Tokenizer) -> None:
    states = RegexStates.of('[^"]{0,4}"')
    assert states is not None
    cache = MaskCache()
    cache.build('[^"]{0,4}"').result(timeout=30)
    tracker = cache.tracker('[^"]{0,4}"')
    assert tracker is not None and tracker.key is not None
    tracker.advance("é".encode()[:1])
    assert tracker.key is None  # the DFA reads characters: no key until the character is whole
    tracker.advance("é".encode()[1:])
    assert tracker.key == ('[^"]{0,4}"', states.after(states.start, "é"))
    tracker.advance(b"\xff")  # not UTF-8: nothing is cached for this matcher any more
    tracker.advance(b"a")
    assert tracker.key is None


def test_leaving_the_regex_ends_the_key() -> None:
    cache = MaskCache()
    cache.build("(search|calculate)").result(timeout=30)
    tracker = cache.tracker("(search|calculate)")
    assert tracker is not None
    tracker.advance(b"sea")
    assert tracker.key is not None
    tracker.advance(b"x")
    assert tracker.key is None


@pytest.mark.parametrize("pattern", [
    r"\d{3}", r"\w+", r"\s", r"a.b", "^abc$", "(?i)abc", "[a[b]]", "[a&&b]", "[a--b]", "[]a]", r"\x{41}",
    "a{0,1000}", r"\bword", r"\p{L}",
])
def test_regexes_outside_the_shared_dialect_are_not_tracked(pattern: str) -> None:
    assert RegexStates.of(pattern) is None
    assert MaskCache().tracker(pattern) is None


@pytest.mark.parametrize("pattern", [r"[a-z ]{16}", r"[^\"\\\x00-\x1f]{0,48}\"", r"\.\-\[x\]", "[-a]"])
def test_common_value_regexes_are_tracked(pattern: str) -> None:
    assert RegexStates.of(pattern) is not None


@pytest.mark.parametrize("pattern", ["[ab]*a[ab]{20}", "(x[a-z]{0,30}){0,30}"])
def test_regexes_whose_dfa_explodes_are_left_uncached(pattern: str) -> None:
    """Their DFAs have millions of states: the build stops at MAX_CRAWLED_STATES (quickly, whatever the clock)."""
    start = time.perf_counter()
    assert RegexStates.of(pattern) is None
    assert time.perf_counter() - start < 5.0
    cache = MaskCache()
    tracker = cache.tracker(pattern)  # the syntax is cacheable: a build starts, and gives up
    assert tracker is not None and cache.build(pattern).result(timeout=30) is None
    tracker.advance(b"a")
    assert tracker.key is None
    assert interegular.fsm.crawl is not grammar_states._bounded_crawl  # interegular's own crawl is back


def test_cache_keeps_the_most_recent_masks() -> None:
    cache = MaskCache(max_masks=2)
    for state in range(3):
        cache.put(("p", state), bytes([state]))
    assert cache.get(("p", 0)) is None and cache.get(("p", 2)) == b"\x02" and len(cache) == 2


def test_matchers_opened_during_the_build_get_keys_once_it_is_done(tokenizer: Tokenizer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the DFA is built a matcher has no key (llguidance computes its masks); then its key is the state
    after all the text it accepted meanwhile, the key of a matcher that took the same text after the build."""
    release = threading.Event()
    real_of = RegexStates.of
    monkeypatch.setattr(RegexStates, "of", staticmethod(lambda pattern: release.wait(30) and real_of(pattern)))
    compiler = make_compiler(tokenizer)
    early = compiler.regex("[a-z ]{16}")
    early.accept_all(tokenizer.encode("ab c"))
    assert early.cache_key is None and early.cached_mask() is None
    mask = early.allowed_token_mask()  # llguidance's own; not stored under any key
    assert len(compiler._masks) == 0
    release.set()
    compiler._masks.build("[a-z ]{16}").result(timeout=30)
    late = compiler.regex("[a-z ]{16}")
    late.accept_all(tokenizer.encode("xy z"))
    assert early.cache_key is not None and early.cache_key == late.cache_key
    assert fill_masks([early, late]) == [mask, mask]


def test_cache_keeps_the_most_recently_opened_regexes() -> None:
    cache = MaskCache(max_regexes=2)
    builds = [cache.build(pattern) for pattern in ("a", "b", "c")]
    assert cache.build("c") is builds[2] and cache.build("b") is builds[1]
    assert cache.build("a") is not builds[0]  # dropped, built again


def test_a_build_that_ends_during_fill_masks_changes_nothing_it_returns(tokenizer: Tokenizer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys appear when the build ends, which may be between fill_masks' reads of them."""
    release = threading.Event()
    real_of, real_one_by_one = RegexStates.of, grammar_module.fill_masks_one_by_one
    monkeypatch.setattr(RegexStates, "of", staticmethod(lambda pattern: release.wait(30) and real_of(pattern)))
    compiler = make_compiler(tokenizer)
    matchers = [compiler.regex("[a-z ]{16}") for _ in range(3)]
    for matcher in matchers:
        matcher.accept_all(tokenizer.encode("ab"))

    def build_ends_meanwhile(ms):  # noqa: ANN001, ANN202
        release.set()
        compiler._masks.build("[a-z ]{16}").result(timeout=30)
        return real_one_by_one(ms)

    monkeypatch.setattr(grammar_module, "fill_masks_one_by_one", build_ends_meanwhile)
    masks = fill_masks(matchers)
    assert masks == [matchers[0].allowed_token_mask()] * 3 and matchers[0].cache_key is not None


def test_a_patterns_syntax_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every matcher opening a regex asks for its tracker: the dialect check runs once per pattern, not per ask
    (counted in the asking thread; the build checks again in its own, RegexStates.of being public)."""
    calls: list[str] = []
    real_is_cacheable, asking = grammar_states.is_cacheable, threading.current_thread()

    def counted(pattern: str) -> bool:
        if threading.current_thread() is asking:
            calls.append(pattern)
        return real_is_cacheable(pattern)

    monkeypatch.setattr(grammar_states, "is_cacheable", counted)
    cache = MaskCache()
    for _ in range(3):
        assert cache.tracker("[a-z]{4}") is not None and cache.tracker(r"\d+") is None
    assert calls == ["[a-z]{4}", r"\d+"]

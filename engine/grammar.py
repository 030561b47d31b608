"""Grammar-constrained generation for `generate`'s constraint (JSON schema, regex), through llguidance.

One GrammarCompiler per process that runs grammars (the runtime's, and the control layer's for decodes in
it) holds llguidance's view of the vocabulary (built on first use from the tokenizer's token bytes, ~0.4 s for
49k tokens); one GrammarMatcher per constrained sequence tracks the grammar state and gives the tokens allowed
at the next step (a mask in ~0.02-0.1 ms). EOS is allowed exactly when the grammar may end; a grammar that can
only end stops the generation. A GrammarSpec is a constraint as plain data (what crosses process boundaries).
"""
from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pie_server.engine.grammar_states import MaskCache, StateTracker
from pie_server.engine.json_regex import schema_regex

# JSON is written compactly but readably ({"a": 1, "b": [2, 3]}): a free-whitespace grammar lets small
# models wander into endless whitespace.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": True}
# Pristine matchers kept by constraint (kind and text): a schema or regex seen before is not parsed, validated
# and compiled again (~1 ms), and a copy starts with the lexer states its first mask built (a fresh matcher's
# first masks cost ~0.4 ms each, a copy's ~0.01 ms). Agents and OpenAI clients send the same few grammars again
# and again.
MAX_CACHED_GRAMMARS = 64


GRAMMAR_KINDS = ("json-schema", "regex")


class GrammarError(ValueError):
    """The schema or regex cannot be compiled; the message says why."""


NO_TOKEN_ALLOWED = "the grammar allows no token here"


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as data: its kind (GRAMMAR_KINDS), its text (a JSON schema or a regex), and the tokens the
    grammar has already accepted, which a new matcher replays (~0.5 us each): a decode that goes on after its
    pages' room ran out starts where the last one left the grammar."""

    kind: str
    text: str
    accepted_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"a grammar's kind is one of {GRAMMAR_KINDS}, got {self.kind!r}")


def json_schema_problem(schema: dict[str, Any]) -> str | None:
    """Why a JSON schema cannot be compiled (None if it can); needs no tokenizer, for early 400s."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as error:
        return str(error)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return (messages[0] if messages else "invalid schema") if is_error else None


class GrammarMatcher:
    def __init__(self, matcher: Any, vocab_size: int, pool: Callable[[], Any], masks: MaskCache,
                 tracker: StateTracker | None, token_bytes: Sequence[bytes]) -> None:
        import llguidance.numpy as lln

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._pool = pool  # its compiler's llguidance.LLExecutor (made on first use), for fill_masks
        self._bitmask = lln.allocate_token_bitmask(1, vocab_size)
        self._fill = lln.fill_next_token_bitmask
        # A regex's masks by DFA state (engine/grammar_states.py); no tracker: every mask from llguidance.
        self._masks = masks
        self._tracker = tracker
        self._token_bytes = token_bytes

    @property
    def stopped(self) -> bool:
        """Nothing but the end may follow (the caller finishes the sequence)."""
        return bool(self._matcher.is_stopped())

    def allowed_token_mask(self) -> bytes:
        """The tokens allowed next as SamplingParams.allowed_token_mask: llguidance's int32 bitmask (token t is
        bit t % 32 of word t // 32) read as little-endian bytes, which is bit t % 8 of byte t // 8."""
        mask = self.cached_mask()
        if mask is not None:
            return mask
        self._fill(self._matcher, self._bitmask)
        if not self._bitmask.any():
            raise GrammarError(NO_TOKEN_ALLOWED)
        mask = self._bitmask[0].astype("<i4", copy=False).tobytes()
        self.remember(mask)
        return mask

    @property
    def cache_key(self) -> tuple[str, int] | None:
        """(regex, DFA state): matchers with one key have one mask; None for a matcher whose masks are not cached."""
        return None if self._tracker is None else self._tracker.key

    def cached_mask(self) -> bytes | None:
        """The mask another matcher of this regex computed in this state, if any (GrammarError in an error
        state)."""
        self._check()
        key = self.cache_key
        return None if key is None else self._masks.get(key)

    def remember(self, mask: bytes) -> None:
        key = self.cache_key
        if key is not None:
            self._masks.put(key, mask)

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)
        self._check()
        self._advance_tracker((token_id,))

    def accept_all(self, token_ids: Sequence[int]) -> None:
        self._matcher.consume_tokens(list(token_ids))
        self._check()
        self._advance_tracker(token_ids)

    def _advance_tracker(self, token_ids: Sequence[int]) -> None:
        if self._tracker is None:
            return
        for token_id in token_ids:  # an id past the tokenizer's (never allowed) ends the tracking: not UTF-8
            self._tracker.advance(self._token_bytes[token_id] if token_id < len(self._token_bytes) else b"\xff")

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"grammar error: {self._matcher.get_error()}")


# From this many matchers on, fill_masks computes their masks in llguidance's thread pool (native threads, the
# GIL released); below, one by one (2-core CPU, masks inside a JSON string value: 8 masks 0.04 ms one by one
# against 0.07 ms in the pool; 32: 0.15 against 0.11; 128: 0.60 against 0.20). `python -m bench.grammar_masks`
# measures both on a host.
MIN_POOLED_MASKS = 16


def fill_masks(matchers: Sequence[GrammarMatcher]) -> list[bytes | GrammarError]:
    """Each matcher's allowed_token_mask(), or the GrammarError it would raise. Matchers of one compiler: those
    whose state's mask is cached take it, the others compute theirs (and cache it)."""
    masks: list[bytes | GrammarError | None] = [_or_error(m.cached_mask) for m in matchers]
    # One computation per uncached state: a burst of agents entering the same value shares its first masks.
    first_of_key: dict[Any, int] = {}
    missing = [i for i, mask in enumerate(masks) if mask is None]
    # Read once: a key appears when its regex's DFA build ends (grammar_states.py), maybe while this runs.
    keys = {i: matchers[i].cache_key or i for i in missing}
    computing = [i for i in missing if first_of_key.setdefault(keys[i], i) == i]
    if computing:
        if len(computing) < MIN_POOLED_MASKS:
            computed = fill_masks_one_by_one([matchers[i] for i in computing])
        else:
            computed = fill_masks_pooled([matchers[i] for i in computing])
        for i, mask in zip(computing, computed):
            masks[i] = mask
        for i in missing:
            masks[i] = masks[first_of_key[keys[i]]]
    return masks  # type: ignore[return-value]


def _or_error(mask_of: Callable[[], bytes | None]) -> bytes | GrammarError | None:
    try:
        return mask_of()
    except GrammarError as error:
        return error


def fill_masks_one_by_one(matchers: Sequence[GrammarMatcher]) -> list[bytes | GrammarError]:
    """Each matcher's allowed_token_mask() (which caches what it computes), or its GrammarError."""
    return [_or_error(m.allowed_token_mask) for m in matchers]  # type: ignore[misc]


def fill_masks_pooled(matchers: Sequence[GrammarMatcher]) -> list[bytes | GrammarError]:
    """The masks computed in llguidance's thread pool (the GIL released while it works), and cached."""
    import llguidance.numpy as lln

    masks: list[bytes | GrammarError | None] = [None] * len(matchers)
    rows = []
    for i, matcher in enumerate(matchers):
        try:
            matcher._check()
            rows.append((matcher._matcher, len(rows), i))
        except GrammarError as error:
            masks[i] = error
    bitmask = lln.allocate_token_bitmask(len(rows), matchers[0]._vocab_size)
    if rows:
        lln.fill_next_token_bitmask_par(matchers[0]._pool(), [(m, row) for m, row, _ in rows], bitmask)
    empty = ~bitmask.any(axis=1)
    words = bitmask.astype("<i4", copy=False)
    for _, row, i in rows:
        if empty[row]:
            masks[i] = GrammarError(NO_TOKEN_ALLOWED)
        else:
            mask = words[row].tobytes()
            matchers[i].remember(mask)
            masks[i] = mask
    return masks  # type: ignore[return-value]


class GrammarCompiler:
    def __init__(self, token_bytes: Sequence[bytes], vocab_size: int, eos_token_ids: Sequence[int],
                 bos_token_id: int | None, encode: Any) -> None:
        self._token_bytes = token_bytes
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._bos_token_id = bos_token_id
        self._encode = encode
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        # (kind, text) -> llguidance.LLMatcher, LRU order
        self._pristine: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pristine_lock = threading.Lock()
        self._executor: Any = None  # llguidance.LLExecutor, made on first use (_pool)
        self._masks = MaskCache()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> "GrammarCompiler":
        """From engine.tokenizer's Tokenizer (token bytes, eos and bos ids, encode) and the model's vocab_size
        (the mask's length: it may exceed the tokenizer's)."""
        return cls(tokenizer.token_bytes(), vocab_size, sorted(tokenizer.eos_token_ids), tokenizer.bos_token_id,
                   tokenizer.encode)

    def json_schema(self, schema_json: str) -> GrammarMatcher:
        return self.matcher(GrammarSpec("json-schema", schema_json))

    def regex(self, pattern: str) -> GrammarMatcher:
        return self.matcher(GrammarSpec("regex", pattern))

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A matcher for spec, past its accepted tokens (GrammarError if the grammar rejects one)."""
        spec = self._regular_form(spec)
        pristine = self._pristine_of(spec)
        tracker = self._masks.tracker(spec.text) if spec.kind == "regex" else None
        matcher = GrammarMatcher(pristine.deep_copy(), self._vocab_size, self._pool, self._masks, tracker,
                                 self._token_bytes)
        if spec.accepted_token_ids:
            matcher.accept_all(spec.accepted_token_ids)
        return matcher

    def _regular_form(self, spec: GrammarSpec) -> GrammarSpec:
        """A JSON schema whose documents are a regular language as the regex of their text (engine/json_regex.py):
        the same documents, with masks cached by DFA state. Other specs as they are."""
        if spec.kind != "json-schema":
            return spec
        regex = _cached_schema_regex(spec.text)
        return spec if regex is None else GrammarSpec("regex", regex, spec.accepted_token_ids)

    def check(self, spec: GrammarSpec) -> None:
        """GrammarError unless spec's grammar compiles; compiles it into the cache (no matcher is made), in the
        form matcher() decodes it."""
        self._pristine_of(self._regular_form(spec))

    def _pristine_of(self, spec: GrammarSpec) -> Any:
        key = (spec.kind, spec.text)  # a hit costs no JSON parsing or grammar building
        with self._pristine_lock:
            pristine = self._pristine.get(key)
            if pristine is not None:
                self._pristine.move_to_end(key)
                return pristine
        pristine = self._compile(_grammar_of(spec))
        with self._pristine_lock:
            self._pristine[key] = pristine
            while len(self._pristine) > MAX_CACHED_GRAMMARS:
                self._pristine.popitem(last=False)
        return pristine

    def _compile(self, grammar: str) -> Any:
        """A validated matcher at the grammar's start whose first mask is computed (its lazy states built)."""
        import llguidance
        import llguidance.numpy as lln

        tokenizer = self._llg_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise GrammarError(f"invalid grammar: {messages[0] if messages else 'unknown error'}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        lln.fill_next_token_bitmask(matcher, lln.allocate_token_bitmask(1, self._vocab_size))
        return matcher

    def _pool(self) -> Any:
        """The thread pool of fill_masks (llguidance's default size: 80 % of the CPUs, at most 32)."""
        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            return self._executor

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                if not self._eos_token_ids:
                    raise GrammarError("the model has no eos token: constrained generation cannot end")
                wrapper = llguidance.TokenizerWrapper(_Vocabulary(
                    list(self._token_bytes), self._eos_token_ids[0], self._bos_token_id, self._encode))
                self._tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self._vocab_size,
                                                         eos_token=self._eos_token_ids)
            return self._tokenizer


_cached_schema_regex = functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)(schema_regex)


def _grammar_of(spec: GrammarSpec) -> str:
    """llguidance's grammar text for a JSON schema or a regex (GrammarError if the schema is not one)."""
    import llguidance

    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    try:
        schema = json.loads(spec.text)
    except json.JSONDecodeError as error:
        raise GrammarError(f"the JSON schema is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be a JSON object")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as error:
        raise GrammarError(f"invalid JSON schema: {error}") from None


class LazyCompiler:
    """A GrammarCompiler made on first use by make (the engine core loads a tokenizer only once a grammar
    comes). Thread-safe."""

    def __init__(self, make: Callable[[], GrammarCompiler]) -> None:
        self._make = make
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def get(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = self._make()
            return self._compiler


# Strings llguidance tokenizes, kept with their ids. It calls back into Python whenever a grammar forces text (the
# rest of a tool name, a JSON schema's next key): 2-3 times a mask under `(search|calculate)`, each a trip through
# transformers' encode (~50 us); agents and clients force the same few strings again and again.
MAX_CACHED_ENCODINGS = 4096


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: token bytes, eos/bos, and a str -> ids encoder."""

    def __init__(self, tokens: list[bytes], eos_token_id: int, bos_token_id: int | None, encode: Any) -> None:
        self.tokens = tokens
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.special_token_ids: list[int] = []
        self._encode = functools.lru_cache(maxsize=MAX_CACHED_ENCODINGS)(lambda text: tuple(encode(text)))

    def __call__(self, text: str) -> list[int]:
        return list(self._encode(text))

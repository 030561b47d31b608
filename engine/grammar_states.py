"""Masks of regex constraints kept by the regex's DFA state, for every matcher of a process.

The tokens a regex allows next depend only on the strings that may still follow, that is on the state of the
regex's minimal DFA after the text so far: two matchers of one regex in one state (two agents four letters into
their `[a-z ]{16}` values) have the same mask. llguidance computes a mask by walking the vocabulary (~0.5 ms
inside `[a-z ]{16}` over 49k tokens) and keeps only each matcher's last one; this cache keeps one per (regex,
state), so a state's mask is computed once per process. interegular builds the DFA (Brzozowski's minimisation);
llguidance stays the grammar's authority: it accepts the tokens, says when the grammar stops, and computes each
state's first mask.

Only regexes whose meaning is the same in both dialects are tracked (literals, character classes with explicit
members, groups, alternation, bounded repetition): engine/regex_syntax.py's pieces and `is_cacheable` keep
out shorthand classes (`\\d`, `\\w`: Unicode in one, maybe ASCII in the other), anchors, `.`, flags and large
counts (the DFA of `{0,2000}` takes long to build). Any other regex runs uncached, as does a JSON schema that
engine/json_regex.py cannot write as a regex.
"""
from __future__ import annotations

import codecs
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from pie_server.engine.regex_syntax import COUNT, FOREIGN, SYNTAX, regex_pieces

MAX_PATTERN_CHARS = 512
MAX_REPEAT = 256  # the largest count in {m,n}
# Masks are vocab_size / 8 bytes (6 KB for 49k tokens, 16 KB for 128k): at most 16 MB.
MAX_CACHED_MASKS = 1024
# DFAs kept, least recently opened first out: the agents' value regexes need tens to hundreds of states each.
MAX_TRACKED_REGEXES = 256


DfaState = int
# A DFA can be exponentially larger than its regex (`[ab]*a[ab]{20}` needs 2^20 states); it is built in a thread
# of its own (MaskCache.build), which still shares the GIL with serving. interegular builds every automaton, the
# intermediate ones too, by crawling its states breadth first; the crawl used here stops at this many states and
# the regex runs uncached. A count, not a clock, so that every process decides alike. The agent's whole action
# with 48-letter thought and input as one regex (a JSON schema, engine/json_regex.py) needs ~300.
MAX_CRAWLED_STATES = 4096
_build_lock = threading.Lock()  # the crawl is swapped into interegular's module for one build at a time


class _TooManyStates(Exception):
    pass


def _bounded_crawl(alphabet: Any, initial: Any, final: Callable[[Any], bool], follow: Callable[[Any, Any], Any]) -> Any:
    """interegular.fsm.crawl's contract (states reached from initial through follow, OblivionError for none),
    indexed by a dict instead of a list scan, and bounded by MAX_CRAWLED_STATES."""
    from interegular.fsm import FSM, OblivionError

    def key(state: Any) -> Any:  # crawled states are sets, frozensets, tuples or dicts of ints
        if isinstance(state, dict):
            return frozenset(state.items())
        return frozenset(state) if isinstance(state, set) else state

    states, index = [initial], {key(initial): 0}
    finals: set[int] = set()
    transitions: dict[int, dict[Any, int]] = {}
    for i, state in enumerate(states):  # grows while it runs
        if final(state):
            finals.add(i)
        transitions[i] = {}
        for symbol in alphabet.by_transition:
            try:
                reached = follow(state, symbol)
            except OblivionError:
                continue
            reached_key = key(reached)
            j = index.get(reached_key)
            if j is None:
                if len(states) >= MAX_CRAWLED_STATES:
                    raise _TooManyStates
                j = index[reached_key] = len(states)
                states.append(reached)
            transitions[i][symbol] = j
    return FSM(alphabet=alphabet, states=range(len(states)), initial=0, finals=finals, map=transitions,
               __no_validation__=True)


def _build_dfa(pattern: str) -> Any:
    """The regex's minimal DFA (interegular, Brzozowski), _TooManyStates if any automaton on the way is too big."""
    import interegular
    import interegular.fsm

    with _build_lock:
        original, interegular.fsm.crawl = interegular.fsm.crawl, _bounded_crawl
        try:
            return interegular.parse_pattern(pattern).to_fsm().reduce()
        finally:
            interegular.fsm.crawl = original


def is_cacheable(pattern: str) -> bool:
    """Whether pattern uses only constructs with the same meaning for interegular and llguidance, without `.`,
    anchors or counts over MAX_REPEAT."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return False
    for piece in regex_pieces(pattern):
        if piece.kind == FOREIGN or (piece.kind == SYNTAX and piece.low in ".^$"):
            return False
        if piece.kind == COUNT and max(int(piece.low), int(piece.high or 0)) > MAX_REPEAT:
            return False
    return True


class RegexStates:
    """A regex's minimal DFA over characters: its start state and the state after a text (None: no string of the
    regex continues it)."""

    def __init__(self, fsm: Any) -> None:
        self._fsm = fsm
        self.start: DfaState = fsm.initial

    @classmethod
    def of(cls, pattern: str) -> "RegexStates | None":
        """None for a regex outside the cacheable subset, one interegular cannot parse, or one whose automata
        outgrow MAX_CRAWLED_STATES."""
        if not is_cacheable(pattern):
            return None
        import interegular

        try:
            return cls(_build_dfa(pattern))
        except (interegular.Unsupported, interegular.InvalidSyntax, ValueError, KeyError, RecursionError,
                _TooManyStates):
            return None

    def after(self, state: DfaState | None, text: str) -> DfaState | None:
        alphabet, transitions = self._fsm.alphabet, self._fsm.map
        for char in text:
            if state is None:
                return None
            key = alphabet[char]
            state = None if key is None else transitions[state].get(key)
        return state


class StateTracker:
    """One matcher's DFA state, advanced by the bytes of the tokens it accepts. `key` is None while a token has
    left half a UTF-8 character (the DFA reads characters), once the text has left the regex, and while the DFA
    is still being built (the text so far is kept and read through it when the build is done)."""

    def __init__(self, pattern: str, built: Future[RegexStates | None]) -> None:
        self._pattern = pattern
        self._built = built
        self._states: RegexStates | None = None
        self._state: DfaState | None = None
        self._text_before_build: list[str] | None = []  # None once the build is done
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    @property
    def key(self) -> tuple[str, DfaState] | None:
        if self._text_before_build is not None and not self._take_build():
            return None
        if self._state is None or self._decoder.getstate()[0]:
            return None
        return self._pattern, self._state

    def advance(self, data: bytes) -> None:
        if self._text_before_build is None and self._state is None:
            return
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError:
            self._states = self._state = None
            self._text_before_build = None
            return
        if self._text_before_build is not None and not self._take_build():
            self._text_before_build.append(text)
        elif self._states is not None:
            self._state = self._states.after(self._state, text)

    def _take_build(self) -> bool:
        """Whether the DFA's build is done; when it just got done, the state after the text so far."""
        if not self._built.done():
            return False
        self._states = None if self._built.exception() is not None else self._built.result()
        if self._states is not None:
            self._state = self._states.after(self._states.start, "".join(self._text_before_build or ()))
        self._text_before_build = None
        return True


class MaskCache:
    """(regex, DFA state) -> the state's mask bytes (SamplingParams.allowed_token_mask), least recently used
    first out. Thread-safe: the control loop and the runtime's threads share a process's compiler."""

    def __init__(self, max_masks: int = MAX_CACHED_MASKS, max_regexes: int = MAX_TRACKED_REGEXES) -> None:
        self._max_masks = max_masks
        self._max_regexes = max_regexes
        self._masks: OrderedDict[tuple[str, DfaState], bytes] = OrderedDict()
        self._builds: OrderedDict[str, Future[RegexStates | None] | None] = OrderedDict()  # None: not cacheable
        self._builder: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def tracker(self, pattern: str) -> StateTracker | None:
        """A tracker at the regex's start (None if the regex is not cacheable). The DFA is built once, in a thread
        of its own (a build may take ~70 ms before it gives up): the matchers that open the regex meanwhile get
        their masks from llguidance until it is done."""
        built = self.build(pattern)
        return None if built is None else StateTracker(pattern, built)

    def build(self, pattern: str) -> Future[RegexStates | None] | None:
        """The build of pattern's DFA (started here if it is not known; its result None: the DFA outgrew the
        bound or interegular refused it); None for a regex that is not cacheable. Both are decided once per
        pattern: reading a pattern's syntax costs ~0.1 ms per 100 characters, and every matcher asks."""
        with self._lock:
            if pattern in self._builds:
                self._builds.move_to_end(pattern)
                return self._builds[pattern]
        cacheable = is_cacheable(pattern)  # outside the lock
        with self._lock:
            if pattern not in self._builds:
                if cacheable and self._builder is None:
                    self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regex-dfa")
                self._builds[pattern] = self._builder.submit(RegexStates.of, pattern) if cacheable else None
                while len(self._builds) > self._max_regexes:
                    self._builds.popitem(last=False)
            return self._builds[pattern]

    def get(self, key: tuple[str, DfaState]) -> bytes | None:
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
            return mask

    def put(self, key: tuple[str, DfaState], mask: bytes) -> None:
        with self._lock:
            self._masks[key] = mask
            self._masks.move_to_end(key)
            while len(self._masks) > self._max_masks:
                self._masks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._masks)

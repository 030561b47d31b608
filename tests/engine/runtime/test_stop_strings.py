from __future__ import annotations

from pie_server.engine.runtime.stop_strings import StopMatcher


def _feed(stops: list[str], deltas: list[str]) -> tuple[str, str, bool]:
    matcher = StopMatcher(stops)
    emitted = "".join(matcher.add(d) for d in deltas)
    if not matcher.stopped:
        emitted += matcher.finish()
    return emitted, matcher.text, matcher.stopped


def test_stop_string_split_across_deltas_is_never_emitted() -> None:
    emitted, text, stopped = _feed(["</end>"], ["Hello </", "en", "d> and more"])
    assert (emitted, text, stopped) == ("Hello ", "Hello ", True)


def test_partial_match_that_fails_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.add("abc ST") == "abc "
    assert matcher.add("ART") == "START"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    emitted, text, stopped = _feed(["world", "lo w"], ["hello world"])
    assert (emitted, text, stopped) == ("hel", "hel", True)


def test_no_stop_strings_emits_everything() -> None:
    assert _feed([], ["a", "b"]) == ("ab", "ab", False)

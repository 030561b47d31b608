"""Stop strings over streamed text: never emit a stop string, or any part of one, also across token
boundaries.

Invariant: `emitted` text is a prefix of the final text; text that could still be the start of a stop
string is held back until the next delta decides it.
"""
from __future__ import annotations

from typing import Sequence


class StopMatcher:
    def __init__(self, stop_strings: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop_strings if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The final text so far (cut before a matched stop string once stopped)."""
        return self._text

    def add(self, delta: str) -> str:
        """Feed decoded text; returns the part that is now safe to emit. Sets `stopped` on a match."""
        if self.stopped or not delta:
            return ""
        if not self._stops:  # nothing to match or hold back: all of it is safe (the common case)
            self._text += delta
            self._emitted = len(self._text)
            return delta
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        cut = self._first_match(search_from)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            return self._take(len(self._text))
        return self._take(len(self._text) - self._held_back())

    def finish(self) -> str:
        """No more text comes: everything not emitted is safe."""
        return self._take(len(self._text))

    def _first_match(self, start: int) -> int | None:
        found = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for length in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        piece = self._text[self._emitted:end]
        self._emitted = end
        return piece

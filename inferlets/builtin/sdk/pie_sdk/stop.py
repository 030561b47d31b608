"""Stop conditions: when a generation ends (max tokens, stop strings, stop tokens, eos).

The coarse `Context.generate` hands a StopCondition to the host, which applies it engine-side. Inferlets
that decode step by step in the guest use StopTracker, which applies the same rules locally: a stop token
ends the generation and its text is dropped; a stop string ends it and neither it nor anything after it is
ever emitted, also when it spans several tokens (text that might begin a stop string is held back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_EVICTED = "evicted"  # a host generation cut short by the last resort of preemption (Context goes on)


@dataclass(frozen=True)
class StopCondition:
    max_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop token ids must be >= 0")

    @classmethod
    def of(cls, max_tokens: int, stop: str | Sequence[str] = (), stop_token_ids: Iterable[int] = (),
           ignore_eos: bool = False) -> "StopCondition":
        """Accepts a single stop string or a sequence of them."""
        strings = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(max_tokens, strings, tuple(int(t) for t in stop_token_ids), ignore_eos)


class StopTracker:
    """Applies a StopCondition to a guest-side decode loop, one token at a time.

    Invariant: `text[:num_emitted]` was returned by `add`/`finish` and never contains a stop string.
    """

    def __init__(self, condition: StopCondition, eos_token_ids: Sequence[int]) -> None:
        self.condition = condition
        self._stop_ids = set(condition.stop_token_ids)
        if not condition.ignore_eos:
            self._stop_ids.update(eos_token_ids)
        self._hold_back = max((len(s) for s in condition.stop_strings), default=1) - 1
        self.text = ""
        self.num_emitted = 0
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def is_stop_token(self, token_id: int) -> bool:
        return token_id in self._stop_ids

    def add(self, token_id: int, text_delta: str) -> str:
        """Record one sampled token and its decoded text; returns the text now safe to emit."""
        if self.finished:
            raise RuntimeError("the generation already finished")
        self.num_tokens += 1
        if token_id in self._stop_ids:
            self.finish_reason = FINISH_STOP
            return self._emit(final=True)
        self._append(text_delta)
        if not self.finished and self.num_tokens >= self.condition.max_tokens:
            self.finish_reason = FINISH_LENGTH
        return self._emit(final=self.finished)

    def finish(self, tail: str = "") -> str:
        """Ends the generation (with the decoder's remaining text); returns the text left to emit."""
        if not self.finished or self.finish_reason == FINISH_LENGTH:
            self._append(tail)
        if self.finish_reason is None:
            self.finish_reason = FINISH_LENGTH
        return self._emit(final=True)

    def _append(self, text_delta: str) -> None:
        if self.finish_reason == FINISH_STOP:
            return
        start = max(0, len(self.text) - self._hold_back)
        self.text += text_delta
        cut = _first_match(self.text, self.condition.stop_strings, start)
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = FINISH_STOP

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final else max(self.num_emitted, len(self.text) - self._hold_back)
        chunk = self.text[self.num_emitted:end]
        self.num_emitted = end
        return chunk


def _first_match(text: str, stop_strings: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string occurrence at or after start, if any."""
    found = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(found) if found else None

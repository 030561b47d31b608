"""Progress bars on stderr for the slow one-off steps a person waits for: reading a model's weights,
dequantizing a GGUF, building an inferlet, a benchmark's requests.

Shown only where someone watches: when stderr is a terminal, so logs, pipes and tests' captured output never
get carriage-return garbage. $PIE_PROGRESS overrides that (1: always, 0: never); `pie --progress` and
`--no-progress` set it, so the engine-core and front-end processes `pie serve` starts follow the choice too.
A caller passes enabled=False for never (tests, benchmarks). Bars advance per tensor, per request or per
polling tick, never per token: nothing here is on a serving path.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from tqdm import tqdm

ENV_VAR = "PIE_PROGRESS"
_ON, _OFF = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
SPINNER_REFRESH_S = 0.5


def show_progress(enabled: bool = True) -> bool:
    """Whether to draw: never when not enabled; else $PIE_PROGRESS when set, else whether stderr is a terminal."""
    if not enabled:
        return False
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in _ON or forced in _OFF:
        return forced in _ON
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(desc: str, iterable: Any = None, total: float | None = None, enabled: bool = True,
                 **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (over iterable, if given), disabled (a pass-through) unless show_progress(enabled)."""
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not show_progress(enabled),
                dynamic_ncols=True, **kwargs)


@contextmanager
def progress_spinner(desc: str, enabled: bool = True) -> Iterator[None]:
    """`desc: 00:07` for a step without a known total, redrawn from a thread while the step blocks."""
    if not show_progress(enabled):
        yield
        return
    done = threading.Event()
    with progress_bar(desc, bar_format="{desc}: {elapsed}") as line:
        ticker = threading.Thread(target=_tick, args=(line, done), name="pie-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def _tick(line: tqdm, done: threading.Event) -> None:
    while not done.wait(SPINNER_REFRESH_S):
        line.refresh()

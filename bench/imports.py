"""The import path of benchmarks run as `python -m bench.NAME` from the repository root."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def without_repo_root() -> Iterator[None]:
    """`python -m bench...` puts the repository root on sys.path, where this project's kernels/ folder hides the
    PyPI package `kernels` that transformers imports when it is installed (AutoTokenizer then fails); the server
    and the tests never have the root there (console script, pytest's importlib mode)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != root]
    try:
        yield
    finally:
        sys.path[:] = saved

"""Keeps the checkout's root off sys.path in the server's processes.

`python -m pie_server.app.cli ...` run from the checkout puts the checkout's root on sys.path (and every process
the command spawns inherits it), where our top-level folders shadow other distributions' import names: Hugging
Face's `kernels`, which transformers imports while it loads a Llama config, resolves to our kernels/ and the
engine fails to start ("cannot import name 'CUDAProperties' from 'kernels'"). Our own code imports only through
the installed root pie_server (docs/decisions/import-root.md), so nothing needs the checkout there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# This file is <root>/app/import_path.py in a checkout; in an installed wheel the "root" is the pie_server folder
# in site-packages, which is never a sys.path entry.
CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def drop_checkout_root() -> None:
    """Removes every sys.path entry that names the checkout's root ('' and '.' when it is the working directory)."""
    sys.path[:] = [entry for entry in sys.path if not _is_checkout_root(entry)]


def _is_checkout_root(entry: str) -> bool:
    try:
        return Path(entry or os.curdir).resolve() == CHECKOUT_ROOT
    except OSError:  # an entry that cannot be resolved is not ours
        return False

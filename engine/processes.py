"""Whether another process of this machine is still there (for cleaning up after processes that ended)."""
from __future__ import annotations

import os
from pathlib import Path


def is_alive(pid: int) -> bool:
    """The process exists and has not ended (a child that ended but was not yet reaped is a zombie: dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")

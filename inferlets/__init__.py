"""The inferlet sources as data of the installed package (`pie_server.inferlets`): the WIT package (`wit/`),
the Python SDK and the default inferlet (`builtin/`), the examples (`contrib/`). Nothing here runs in the
host; the server builds these folders into Wasm components (pie_server.app.inferlet_build)."""
from __future__ import annotations

from pathlib import Path

INFERLETS_DIR = Path(__file__).resolve().parent
WIT_DIR = INFERLETS_DIR / "wit"
SDK_DIR = INFERLETS_DIR / "builtin" / "sdk"
DEFAULT_INFERLET_SOURCE = INFERLETS_DIR / "builtin" / "default"
CONTRIB_DIR = INFERLETS_DIR / "contrib"

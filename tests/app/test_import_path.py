"""app/import_path.py: `python -m pie_server.app.cli` from the checkout must not let our top-level folders shadow
other distributions (Hugging Face's `kernels`, which transformers imports)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pie_server.app import cli
from pie_server.app.import_path import CHECKOUT_ROOT, drop_checkout_root

_PROBE = """
import importlib.util, sys
from pie_server.app.import_path import drop_checkout_root
def origin():
    spec = importlib.util.find_spec("kernels")
    return spec.origin if spec is not None else None
print(origin())
drop_checkout_root()
importlib.invalidate_caches()
print(origin())
"""


def test_the_checkout_stops_shadowing_other_packages_once_dropped() -> None:
    """`python -c` in the checkout has it on sys.path, as `python -m pie_server.app.cli` does."""
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=CHECKOUT_ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    ours = str(CHECKOUT_ROOT / "kernels" / "__init__.py")
    assert out[0] == ours  # the shadowing this guards against
    assert out[1] != ours  # Hugging Face's (in site-packages), or none where it is not installed


def test_entries_that_name_the_checkout_go_and_the_rest_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CHECKOUT_ROOT)
    monkeypatch.setattr(sys, "path", ["", str(CHECKOUT_ROOT), str(CHECKOUT_ROOT / "app" / ".."), "/nonexistent",
                                      str(CHECKOUT_ROOT / "tests")])
    drop_checkout_root()
    assert sys.path == ["/nonexistent", str(CHECKOUT_ROOT / "tests")]


def test_the_cli_drops_the_checkout_before_it_runs_a_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(CHECKOUT_ROOT), *sys.path])
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert str(CHECKOUT_ROOT) not in sys.path

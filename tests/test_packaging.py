"""The installed package: one import root of our own (`pie_server`) that no other installed distribution also
provides, a package list equal to the folders on disk, and no source file importing the design's folders as
top-level names (`engine`, `kernels`, ...), which work only where the checkout happens to be on sys.path."""
from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pie_server.inferlets

DISTRIBUTION = "pie-server"
IMPORT_ROOT = "pie_server"
FOLDERS = {"app": "app", "engine": "engine", "kernels": "kernels", "inferlets": "inferlets"}
REPO_ROOT = pie_server.inferlets.INFERLETS_DIR.parent
# Python sources that run in the host: ours and the tests' and benchmarks'. Inferlet guests import only pie_sdk.
SCANNED = ("app", "engine", "kernels", "tests", "bench", "scripts")


def _our_top_level_names() -> set[str]:
    """Top-level import names that our distribution declares (setuptools writes them to top_level.txt)."""
    text = importlib.metadata.distribution(DISTRIBUTION).read_text("top_level.txt") or ""
    return {line.strip() for line in text.splitlines() if line.strip()}


def test_our_distribution_adds_one_import_root() -> None:
    assert _our_top_level_names() == {IMPORT_ROOT}


def test_no_other_distribution_provides_our_import_names() -> None:
    """The defect of issue 10: Hugging Face's `kernels` (a dependency of transformers) and our `kernels` folder
    shared an import name. Any installed distribution besides ours that provides one of our names fails this."""
    providers = importlib.metadata.packages_distributions()
    for name in _our_top_level_names():
        others = sorted({dist for dist in providers.get(name, []) if dist != DISTRIBUTION})
        assert not others, f"import name {name!r} is also provided by {others}"


def test_package_list_covers_every_folder_with_python_code() -> None:
    """pyproject.toml lists the packages explicitly (the package-dir mapping needs it): a new subpackage that is
    missing there would be left out of a wheel while still working in the editable install."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"{IMPORT_ROOT}.{name}": folder for name, folder in FOLDERS.items()}
    on_disk = {f"{IMPORT_ROOT}.inferlets"}
    for name in ("app", "engine", "kernels"):
        for init in (REPO_ROOT / FOLDERS[name]).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO_ROOT / FOLDERS[name]).parts
            on_disk.add(".".join((IMPORT_ROOT, name, *parts)))
    assert set(config["packages"]) == on_disk


def _top_level_imports(path: Path) -> set[str]:
    return {module.split(".")[0] for module in _imported_modules(path)}


def test_sources_import_the_installed_root_only() -> None:
    offenders = []
    for folder in SCANNED:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            bad = _top_level_imports(path) & set(FOLDERS)
            if bad:
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {sorted(bad)}")
    assert not offenders, "import through pie_server instead:\n" + "\n".join(offenders)


def test_the_cli_imports_from_outside_the_checkout() -> None:
    """From a folder that is not the checkout, the CLI module and the inferlet sources it builds are found
    through the installed package."""
    script = ("import pie_server.app.cli, pie_server.inferlets as i; "
              "print(i.DEFAULT_INFERLET_SOURCE.joinpath('main.py').is_file(), "
              "i.WIT_DIR.joinpath('world.wit').is_file())")
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_kernels_import_nothing_from_the_engine() -> None:
    """Layering: the engine uses the kernels, never the reverse (shared types are plain ints and protocols)."""
    offenders = [str(path.relative_to(REPO_ROOT)) for path in sorted((REPO_ROOT / "kernels").rglob("*.py"))
                 if any(name.startswith(f"{IMPORT_ROOT}.engine") for name in _imported_modules(path))]
    assert not offenders


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules

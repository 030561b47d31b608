"""Frozen configuration of the inferlet runtime, and what it tells inferlets about the model."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pie_server.engine.types import TokenId

API_VERSION = "0.1.0"
WIT_PACKAGE = "pie:inferlet"


@dataclass(frozen=True)
class ModelInfo:
    """What the `model` interface reports."""

    name: str
    vocab_size: int
    page_size: int
    max_context_len: int
    chat_template: str = ""
    bos_token_id: TokenId | None = None
    eos_token_ids: tuple[TokenId, ...] = ()
    stop_token_ids: tuple[TokenId, ...] = ()

    def __post_init__(self) -> None:
        if self.vocab_size <= 0 or self.page_size <= 0 or self.max_context_len <= 0:
            raise ValueError("vocab_size, page_size and max_context_len must be positive")
        for token_id in (*self.eos_token_ids, *self.stop_token_ids,
                         *(() if self.bos_token_id is None else (self.bos_token_id,))):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"special token id {token_id} outside the vocabulary")


@dataclass(frozen=True)
class RuntimeConfig:
    """Sandbox limits and host settings. Times in seconds, sizes in bytes."""

    time_budget_s: float = 600.0  # wall clock per instance, waiting included
    memory_limit_bytes: int = 256 << 20  # per instance linear memory
    max_pages_per_instance: int | None = None  # KV page quota (None: the control layer's default)
    # Per tenant, over all its live instances in this runtime (engine/runtime/tenant_quota.py); None: no quota.
    max_instances_per_tenant: int | None = None  # a launch over it raises TenantQuotaError
    max_pages_per_tenant: int | None = None  # an allocation over it is refused to the inferlet (ControlError)
    epoch_tick_s: float = 0.005  # a running guest yields to the scheduler at least this often
    cache_dir: str | None = None  # compiled components (None: a temporary directory)
    # The compiled components' disk cache is kept under this many bytes, least recently used evicted first
    # (engine/runtime/programs.py); None: unbounded. About 40 MB per componentize-py inferlet.
    compile_cache_bytes: int | None = 2048 << 20
    log_dir: str | None = None  # if set, each instance's WASI stdout/stderr is written here when it ends
    max_log_bytes: int = 64 << 10  # per instance, kept in memory
    http_allowed_hosts: tuple[str, ...] = ()  # exact host names, or "*.example.com" for subdomains
    http_timeout_s: float = 30.0
    http_max_response_bytes: int = 8 << 20
    # Fetches in flight at once over all instances (threads of the runtime's I/O pool; more wait their turn):
    # an agent per task with a 100 ms tool keeps one busy per agent, so 8 made 128 agents queue for 1.6 s.
    http_max_in_flight: int = 128
    # fetch-start requests one instance may have in flight (each holds a slot of the pool above)
    http_max_pending_per_instance: int = 16
    max_message_bytes: int = 1 << 20  # one message to or from the client, or one broadcast
    max_store_key_bytes: int = 256
    max_store_value_bytes: int = 1 << 20
    max_store_bytes_per_tenant: int = 64 << 20
    max_generate_batch: int = 64  # requests in one generate-all / forward-all
    # Host-side generate decodes in the control layer (docs/decisions/decoding-in-control.md); False: a forward
    # per token; None: with_decode_choice decides (on; a Runtime made directly decodes in the control layer).
    decode_in_control: bool | None = None
    # Pages of room such a decode gets past its pending tokens, and again (extend_decode, if free) each time it
    # has used half of its room, while it runs: up to one and a half times this many pages held ahead of need.
    # 1 measured best with the control layer in this process (2-core CPU, HTTP c=8: 71 tok/s against 58-61 with
    # 4, when a decode still ended at its room); a front end of an engine core uses 4, so that the allocation's
    # round trip comes back long before the decode reaches the end of its room (engine/front.py).
    decode_room_pages: int = 1
    mailbox_capacity: int = 10_000  # undelivered client->inferlet or broadcast messages per instance
    # Bytes of messages to the client not yet read, per instance: a guest's send waits while the outbox holds
    # this many or more (backpressure from a slow client), so one instance's buffer stays under this plus one
    # message. Host-side generate streams past it (its output is bounded by max-tokens).
    max_outbox_bytes: int = 4 << 20
    extra_wasi_env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.time_budget_s <= 0 or self.epoch_tick_s <= 0 or self.http_timeout_s <= 0:
            raise ValueError("time_budget_s, epoch_tick_s and http_timeout_s must be positive")
        if self.memory_limit_bytes < 1 << 16:
            raise ValueError("memory_limit_bytes must be at least one wasm page (64 KiB)")
        for name in ("max_pages_per_instance", "max_instances_per_tenant", "max_pages_per_tenant",
                     "compile_cache_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or None: no limit)")
        for name in ("http_max_response_bytes", "http_max_in_flight", "http_max_pending_per_instance",
                     "max_message_bytes", "max_store_key_bytes", "max_store_value_bytes",
                     "max_store_bytes_per_tenant", "max_generate_batch", "max_log_bytes", "mailbox_capacity",
                     "decode_room_pages", "max_outbox_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def limits_for(self, override: "InstanceLimits | None") -> "InstanceLimits":
        """One instance's limits: the override's where it sets them, else this config's. An override may only
        tighten: above this config's value (the server's maximum) it raises LimitError."""
        maxima = InstanceLimits(self.time_budget_s, self.memory_limit_bytes, self.max_pages_per_instance)
        resolved: dict[str, Any] = {}
        for name in (f.name for f in fields(InstanceLimits)):
            wanted, maximum = getattr(override, name, None), getattr(maxima, name)
            if wanted is not None and maximum is not None and wanted > maximum:
                raise LimitError(name, maximum, f"{name} {wanted} is above this runtime's maximum {maximum}")
            resolved[name] = maximum if wanted is None else wanted
        return InstanceLimits(**resolved)


class LimitError(ValueError):
    """A per-launch limit above the runtime's maximum; field names the InstanceLimits field."""

    def __init__(self, field: str, maximum: float, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.maximum = maximum


@dataclass(frozen=True)
class InstanceLimits:
    """One instance's sandbox limits, where a launch sets its own (each None: the RuntimeConfig's)."""

    time_budget_s: float | None = None  # wall clock, waiting included
    memory_limit_bytes: int | None = None  # linear memory
    max_pages: int | None = None  # KV pages the instance may hold (None after limits_for: no quota)

    def __post_init__(self) -> None:
        for name in ("time_budget_s", "memory_limit_bytes", "max_pages"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be positive")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes < 1 << 16:
            raise ValueError("memory_limit_bytes must be at least one wasm page (64 KiB)")

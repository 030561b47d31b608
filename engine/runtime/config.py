"""Frozen configuration of the inferlet runtime, and what it tells inferlets about the model."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    epoch_tick_s: float = 0.005  # a running guest yields to the scheduler at least this often
    cache_dir: str | None = None  # compiled components (None: a temporary directory)
    log_dir: str | None = None  # if set, each instance's WASI stdout/stderr is written here when it ends
    max_log_bytes: int = 64 << 10  # per instance, kept in memory
    http_allowed_hosts: tuple[str, ...] = ()  # exact host names, or "*.example.com" for subdomains
    http_timeout_s: float = 30.0
    http_max_response_bytes: int = 8 << 20
    max_message_bytes: int = 1 << 20  # one message to or from the client, or one broadcast
    max_store_key_bytes: int = 256
    max_store_value_bytes: int = 1 << 20
    max_store_bytes_per_tenant: int = 64 << 20
    max_generate_batch: int = 64  # requests in one generate-all / forward-all
    # Host-side generate decodes in the control layer (docs/decisions/decoding-in-control.md); False: a forward
    # per token; None: with_decode_choice decides (on; a Runtime made directly decodes in the control layer).
    decode_in_control: bool | None = None
    # Pages of room such a decode gets past its pending tokens: one round trip to the host per this many pages of
    # tokens, against as many pages held unused per sequence. 1 measured best with the control layer in this
    # process (2-core CPU, HTTP c=8: 71 tok/s against 58-61 with 4); a front end of an engine core uses 4, where
    # a round trip (an allocation and a new decode) costs the sequence a step or two (engine/front.py).
    decode_room_pages: int = 1
    mailbox_capacity: int = 10_000  # undelivered client->inferlet or broadcast messages per instance
    extra_wasi_env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.time_budget_s <= 0 or self.epoch_tick_s <= 0 or self.http_timeout_s <= 0:
            raise ValueError("time_budget_s, epoch_tick_s and http_timeout_s must be positive")
        if self.memory_limit_bytes < 1 << 16:
            raise ValueError("memory_limit_bytes must be at least one wasm page (64 KiB)")
        if self.max_pages_per_instance is not None and self.max_pages_per_instance <= 0:
            raise ValueError("max_pages_per_instance must be positive")
        for name in ("http_max_response_bytes", "max_message_bytes", "max_store_key_bytes",
                     "max_store_value_bytes", "max_store_bytes_per_tenant", "max_generate_batch", "max_log_bytes",
                     "mailbox_capacity", "decode_room_pages"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

"""What the engine serves: the model's name, vocabulary, KV page size and special tokens."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from wit_world.imports import model


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    page_size: int  # KV slots per page
    max_context_len: int  # tokens one instance may hold
    chat_template: str  # "" when the model has none
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # end a generation unless ignore_eos
    stop_token_ids: tuple[int, ...]  # further end-of-turn tokens (chat)


@lru_cache(maxsize=1)
def model_info() -> ModelInfo:
    """Asked once per instance (never at build time: componentize-py snapshots module state)."""
    raw = model.info()
    return ModelInfo(name=raw.name, vocab_size=raw.vocab_size, page_size=raw.page_size,
                     max_context_len=raw.max_context_len, chat_template=raw.chat_template,
                     bos_token_id=raw.bos_token_id, eos_token_ids=tuple(raw.eos_token_ids),
                     stop_token_ids=tuple(raw.stop_token_ids))


def list_models() -> list[str]:
    return list(model.list_models())

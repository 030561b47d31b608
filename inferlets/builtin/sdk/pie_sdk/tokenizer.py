"""The model's tokenizer (it runs host-side)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from wit_world.imports import tokenize

from .errors import call


def encode(text: str) -> list[int]:
    """Text to token ids; adds no special tokens (chat templates carry their own)."""
    return list(tokenize.encode(text))


def decode(token_ids: Sequence[int]) -> str:
    return call(tokenize.decode, list(token_ids))


def apply_chat_template(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                        add_generation_prompt: bool = True) -> str:
    """Renders [{"role": ..., "content": ...}, ...] with the model's chat template."""
    tools_json = None if tools is None else json.dumps(list(tools))
    return call(tokenize.apply_chat_template, json.dumps(list(messages)), tools_json, add_generation_prompt)


def vocabulary() -> list[bytes]:
    """The bytes of every token, indexed by token id."""
    return list(tokenize.vocabulary())


class Decoder:
    """Streaming detokenization: `add` returns only text that is final (never half a character)."""

    def __init__(self) -> None:
        self._decoder = tokenize.Decoder()

    def add(self, token_ids: Sequence[int]) -> str:
        return call(self._decoder.add, list(token_ids))

    def flush(self) -> str:
        return self._decoder.flush()

    def close(self) -> None:
        self._decoder.__exit__(None, None, None)

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

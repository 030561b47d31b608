"""The model's tokenizer (it runs host-side)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from wit_world.imports import tokenize

from .errors import call


# Short texts an instance encodes again and again (an agent's JSON keys, a chat turn's head) are answered from
# memory, not by a host call: the tokenizer never changes while an instance runs.
MAX_MEMO_CHARS = 64
MAX_MEMO_TEXTS = 256
_memo: dict[str, tuple[int, ...]] = {}


def encode(text: str) -> list[int]:
    """Text to token ids; adds no special tokens (chat templates carry their own)."""
    if len(text) > MAX_MEMO_CHARS:
        return list(tokenize.encode(text))
    token_ids = _memo.get(text)
    if token_ids is None:
        token_ids = tuple(tokenize.encode(text))
        if len(_memo) < MAX_MEMO_TEXTS:
            _memo[text] = token_ids
    return list(token_ids)


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

"""What the host needs from a tokenizer, and an adapter over engine/tokenizer.py.

The host only calls the `RuntimeTokenizer` protocol, so tests can pass a small fake.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from pie_server.engine.types import TokenId


class StreamDecoder(Protocol):
    def add(self, token_ids: Sequence[TokenId]) -> str:
        """Text that became final with these tokens (never half a character)."""

    def flush(self) -> str:
        """What is left."""


class RuntimeTokenizer(Protocol):
    def encode(self, text: str) -> list[TokenId]: ...

    def decode(self, token_ids: Sequence[TokenId]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            add_generation_prompt: bool) -> str: ...

    def vocabulary(self) -> list[bytes]:
        """The bytes of each token id, indexed by id."""

    def new_decoder(self) -> StreamDecoder:
        """Special tokens printed as the decoder spells them. A tokenizer that supports vLLM's options also
        takes new_decoder(skip_special_tokens=..., spaces_between_special_tokens=...)."""


class EngineTokenizerAdapter:
    """Wraps engine.tokenizer's tokenizer (encode/decode/apply_chat_template) and its IncrementalDecoder.

    Calls are forwarded by name; where the wrapped object lacks one, the error says which.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._vocabulary: list[bytes] | None = None
        # new_decoder's byte-level table (engine/byte_level.py), built with the runtime, not by its first request
        build_table = getattr(tokenizer, "byte_level_table", None)
        if callable(build_table):
            build_table()

    def encode(self, text: str) -> list[TokenId]:
        return list(self._tokenizer.encode(text))

    def decode(self, token_ids: Sequence[TokenId]) -> str:
        return str(self._tokenizer.decode(list(token_ids)))

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            add_generation_prompt: bool) -> str:
        return str(self._tokenizer.apply_chat_template(messages, tools=tools,
                                                       add_generation_prompt=add_generation_prompt))

    def vocabulary(self) -> list[bytes]:
        if self._vocabulary is None:
            source = getattr(self._tokenizer, "token_bytes", None)
            if callable(source):
                self._vocabulary = [bytes(b) for b in source()]
            else:
                size = int(getattr(self._tokenizer, "vocab_size"))
                self._vocabulary = [self.decode([i]).encode("utf-8") for i in range(size)]
        return self._vocabulary

    def new_decoder(self, skip_special_tokens: bool = False,
                    spaces_between_special_tokens: bool = True) -> StreamDecoder:
        from pie_server.engine.tokenizer import IncrementalDecoder  # written alongside; imported lazily
        return IncrementalDecoder(self._tokenizer, skip_special_tokens=skip_special_tokens,
                                  spaces_between_special_tokens=spaces_between_special_tokens)

"""Streaming detokenization without the tokenizer's decode, for byte-level BPE vocabularies (GPT-2, Llama 3,
Qwen, SmolLM): the text of a token stream is the concatenation of its tokens' bytes read as UTF-8, so a stream
is decoded by looking each id's bytes up and feeding them to an incremental UTF-8 decoder.

Why: the streamed tokens of every request are detokenized on the front end's scheduler thread, and the
tokenizer's own decode costs two calls into Rust per token (the window and its read prefix, engine/tokenizer.py's
IncrementalDecoder), each of which gives the GIL up and waits to take it back while the event loop streams:
about 9 us per token under load on the 2-core CPU machine, against 0.5 us here.

Invariant (checked when the table is built, `byte_level_table`): for ids that are not added tokens, the
tokenizer's decode of any id sequence equals `b"".join(bytes).decode("utf-8", "replace")` (Rust's lossy UTF-8
and Python's "replace" substitute the same maximal invalid subparts). Added tokens (special or not) are not
bytes of the stream: the caller skips them or leaves this path (IncrementalDecoder).
"""
from __future__ import annotations

import codecs
import random
from typing import Any, Callable, Sequence

from pie_server.engine.types import TokenId

NUM_CHECKED_IDS = 512  # single ids decoded both ways when the table is built
NUM_CHECKED_RUNS = 64  # and runs of random ids (invalid byte sequences included)


def byte_level_table(decode: Callable[[list[TokenId]], str], token_bytes: Callable[[], Sequence[bytes]],
                     added_ids: set[TokenId], decoder_kinds: set[str], seed: int = 0) -> list[bytes] | None:
    """token_bytes() when the stream of a vocabulary may be decoded from it (decoder_kinds: its tokenizer.json
    decoder steps, only {'ByteLevel'} qualifies, and only then is token_bytes called; decode: the tokenizer's,
    without clean-up), else None. A sample of ids and runs is decoded both ways: one difference and the fast path
    stays off."""
    if decoder_kinds != {"ByteLevel"}:
        return None
    table = list(token_bytes())
    regular = [i for i in range(len(table)) if i not in added_ids and table[i]]
    if not regular:
        return None
    rng = random.Random(seed)
    singles = [[i] for i in rng.sample(regular, min(NUM_CHECKED_IDS, len(regular)))]
    runs = [[rng.choice(regular) for _ in range(rng.randrange(2, 12))] for _ in range(NUM_CHECKED_RUNS)]
    for ids in singles + runs:
        if decode(ids) != b"".join(table[i] for i in ids).decode("utf-8", "replace"):
            return None
    return table


class ByteLevelStream:
    """The text of a stream of regular (not added) token ids, piece by piece: never part of a character, and
    the pieces' concatenation is the stream's decode. context: the bytes before the stream (the prompt's end),
    never emitted; a character they leave incomplete is completed, and emitted, by the stream's first bytes."""

    def __init__(self, table: list[bytes], context: bytes = b"") -> None:
        self._table = table
        self._utf8: Any = codecs.getincrementaldecoder("utf-8")("replace")
        self._utf8.decode(context)

    def add(self, token_id: TokenId) -> str:
        return self._utf8.decode(self._table[token_id])  # type: ignore[no-any-return]

    def flush(self) -> str:
        """What an incomplete character left pending (as U+FFFD); the stream may go on after it."""
        text: str = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

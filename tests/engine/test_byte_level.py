"""Streaming detokenization on the byte-level path (engine/byte_level.py) against the tokenizer's own decode, on
the default model's byte-level BPE tokenizer; the path stays off where it could differ."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from pie_server.engine.byte_level import ByteLevelStream, byte_level_table
from pie_server.engine.tokenizer import REPLACEMENT_CHAR, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def _random_ids(tokenizer: Tokenizer, rng: random.Random, added_share: float) -> list[int]:
    added = sorted(tokenizer.added_token_contents)
    return [rng.choice(added) if rng.random() < added_share else rng.randrange(tokenizer.vocab_size)
            for _ in range(rng.randrange(1, 40))]


def test_the_default_tokenizer_streams_without_calling_its_decode(tokenizer: Tokenizer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert tokenizer.byte_level_table() is not None
    decoder = tokenizer.incremental_decoder(context_ids=tokenizer.encode("Say hi:"))
    calls = []
    monkeypatch.setattr(tokenizer, "_decode_checked", lambda ids, skip: calls.append(ids) or "")
    ids = tokenizer.encode("héllo 世界 🙂 and more text")
    text = "".join(decoder.add([token_id]) for token_id in ids) + decoder.flush()
    monkeypatch.undo()
    assert calls == [] and text == tokenizer.decode(ids) == "héllo 世界 🙂 and more text"


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_streams_with_added_tokens_equal_the_full_decode(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    """Added tokens are a fifth of the ids here: skipped ones keep the fast path, printed ones leave it."""
    rng = random.Random(11)
    for _ in range(200):
        ids = _random_ids(tokenizer, rng, added_share=0.2)
        decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
        pieces, start = [], 0
        while start < len(ids):
            size = rng.choice([1, 1, 2, 3])
            pieces.append(decoder.add(ids[start:start + size]))
            start += size
        assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids, skip_special_tokens)


def test_added_tokens_joined_raw_leave_the_fast_path(tokenizer: Tokenizer) -> None:
    """vLLM's spaces_between_special_tokens=false: what follows the first printed added token is decoded as
    the slow path does it."""
    rng = random.Random(5)
    for _ in range(100):
        ids = _random_ids(tokenizer, rng, added_share=0.3)
        decoder = tokenizer.incremental_decoder(spaces_between_special_tokens=False)
        text = "".join(decoder.add([token_id]) for token_id in ids) + decoder.flush()
        assert text == tokenizer._decode_added_tokens_joined(ids)


def test_a_skipped_special_token_keeps_a_character_together(tokenizer: Tokenizer) -> None:
    """Its bytes on both sides join, as they do when the tokenizer drops it before decoding."""
    table = tokenizer.vocab()
    head, *tail = [table.index(bytes([b])) for b in "🙂".encode()]
    special = min(tokenizer.special_token_ids)
    decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
    assert decoder.add([head, special]) == "" and decoder.add(tail) == "🙂"
    assert decoder._fast is not None


def test_printing_an_added_token_flushes_an_incomplete_character(tokenizer: Tokenizer) -> None:
    head = tokenizer.vocab().index("🙂".encode()[:1])
    im_end = tokenizer.token_to_id("<|im_end|>")
    decoder = tokenizer.incremental_decoder()
    text = decoder.add([head]) + decoder.add([im_end]) + decoder.add(tokenizer.encode(" ok")) + decoder.flush()
    assert decoder._fast is None
    assert text == tokenizer.decode([head, im_end, *tokenizer.encode(" ok")]) == REPLACEMENT_CHAR + "<|im_end|> ok"


def test_only_a_vocabulary_that_decodes_byte_by_byte_qualifies(tokenizer: Tokenizer) -> None:
    table = tokenizer.vocab()
    added = set(tokenizer.added_token_contents)
    decode = tokenizer.decode
    assert byte_level_table(decode, lambda: table, added, {"ByteLevel"}) == table
    assert byte_level_table(decode, lambda: table, added, {"Replace:▁", "ByteFallback"}) is None
    assert byte_level_table(decode, lambda: table, added, {"ByteLevel", "Strip"}) is None
    assert byte_level_table(lambda ids: decode(ids).strip(), lambda: table, added, {"ByteLevel"}) is None  # clean-up


def test_a_sentencepiece_tokenizer_keeps_the_slow_path(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0)] + [(f"<0x{b:02X}>", -10.0) for b in range(256)] + [("▁a", -1.0)]
    raw = RawTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(str(tmp_path))
    sp = Tokenizer.from_dir(tmp_path)
    assert sp.byte_level_table() is None and sp.incremental_decoder()._fast is None


def test_context_bytes_are_never_emitted_but_complete_a_character() -> None:
    table = [b"a", b"\xf0\x9f", b"\x99\x82", b"b"]
    stream = ByteLevelStream(table, context=b"a\xf0\x9f")
    assert stream.add(2) == "🙂" and stream.add(3) == "b" and stream.flush() == ""
    stream = ByteLevelStream(table)
    assert stream.add(1) == "" and stream.flush() == REPLACEMENT_CHAR and stream.add(0) == "a"


def test_one_bad_id_in_a_list_is_still_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.check_ids([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="integers"):
        tokenizer.check_ids([True])
    assert tokenizer.check_ids([5]) == [5]

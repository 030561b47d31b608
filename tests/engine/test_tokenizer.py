"""The tokenizer service on the default model's tokenizer (byte-level BPE) and on a small SentencePiece-style
one (▁ spaces, <0xHH> byte fallback, leading-space strip) built here."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pie_server.engine.tokenizer import REPLACEMENT_CHAR, IncrementalDecoder, Tokenizer

MIXED_TEXT = "héllo 世界 🙂"
SENTENCE = "The quick brown fox said: «naïve café, 東京タワー!» 🙂🎉 done.\n"
USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style tokenizer: Unigram pieces, bytes 0..255 as <0xHH>, no chat template."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "é", "▁h", "▁w", "ll", "▁hello", "▁world", "lo"]
    vocab = ([("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", -10.0) for b in range(256)]
             + [(piece, -1.0 / len(piece)) for piece in pieces])
    raw = RawTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    out_dir = tmp_path_factory.mktemp("sp-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def sp_tokenizer(sp_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(sp_dir)


def _stream(decoder: IncrementalDecoder, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random chunks of 1-3 (sometimes an empty one); return every piece, flush included."""
    pieces, start = [], 0
    while start < len(ids):
        size = rng.choice([0, 1, 1, 1, 2, 3])
        pieces.append(decoder.add(ids[start:start + size]))
        start += size
    pieces.append(decoder.flush())
    return pieces


# ------------------------------------------------------------------------------------- default model

def test_special_tokens_of_the_default_model(tokenizer: Tokenizer) -> None:
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end == 2 and im_end in tokenizer.eos_token_ids
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>") == 1
    assert {0, 1, 2} <= tokenizer.special_token_ids
    assert tokenizer.vocab_size == 49152
    assert tokenizer.encode("<|im_end|>") == [im_end]


def test_encode_decode_round_trip(tokenizer: Tokenizer) -> None:
    for text in (MIXED_TEXT, SENTENCE, "", "  two  spaces\ttab"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tokenizer.decode(ids[0]) == "<|im_start|>"


def test_bad_ids_and_text_are_rejected(tokenizer: Tokenizer) -> None:
    for bad in ([tokenizer.vocab_size], [-1], [1.5], [True], "abc", [None]):
        with pytest.raises(ValueError):
            tokenizer.decode(bad)
    with pytest.raises(ValueError, match="must be a str"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.id_to_token(10**6)


def test_token_strings_map_both_ways(tokenizer: Tokenizer) -> None:
    (hello,) = tokenizer.encode(" hello")
    assert tokenizer.id_to_token(hello) == "Ġhello"
    assert tokenizer.token_to_id("Ġhello") == hello
    assert tokenizer.token_to_id("no such token, surely") is None


def test_chat_template_of_the_default_model(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template(USER_HI)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert not tokenizer.apply_chat_template(USER_HI, add_generation_prompt=False).endswith("assistant\n")
    assert tokenizer.encode_chat(USER_HI) == tokenizer.encode(text)
    suffix = tokenizer.encode("<|im_start|>assistant\n")
    assert tokenizer.encode_chat(USER_HI)[-len(suffix):] == suffix


def test_bad_conversations_are_rejected(tokenizer: Tokenizer) -> None:
    for bad in ("hi", {"role": "user"}, [{"content": "no role"}], ["hi"]):
        with pytest.raises(ValueError, match="messages|message 0"):
            tokenizer.apply_chat_template(bad)  # type: ignore[arg-type]


def test_chat_template_inside_tokenizer_config(default_model_dir: Path, tmp_path: Path) -> None:
    """The transformers 4 layout: the template in tokenizer_config.json, no chat_template.jinja."""
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    template_file = default_model_dir / "chat_template.jinja"
    config.setdefault("chat_template", template_file.read_text() if template_file.exists() else None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(default_model_dir / "tokenizer.json", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    moved = Tokenizer.from_dir(tmp_path)
    original = Tokenizer.from_dir(default_model_dir)
    assert moved.apply_chat_template(USER_HI) == original.apply_chat_template(USER_HI)
    assert moved.eos_token_ids == {0, 2}  # the tokenizer's eos plus generation_config's list


def test_template_gets_tools_and_extra_variables(sp_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(sp_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ greeting }}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer = Tokenizer.from_dir(tmp_path)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    assert tokenizer.apply_chat_template(USER_HI, tools=tools, greeting="hey ") == "[search]hey user:hi;assistant:"


def test_a_model_without_chat_template_says_so(sp_tokenizer: Tokenizer) -> None:
    assert sp_tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        sp_tokenizer.encode_chat(USER_HI)


def test_token_bytes_concatenate_to_the_decoded_text(tokenizer: Tokenizer) -> None:
    table = tokenizer.vocab()
    assert len(table) == tokenizer.vocab_size and table == tokenizer.token_bytes()
    assert table[tokenizer.encode(" hello")[0]] == b" hello" and table[2] == b"<|im_end|>"
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(30)]
        assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == tokenizer.decode(ids)


# -------------------------------------------------------------------------------- incremental decode

def test_incremental_decode_never_emits_half_a_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MIXED_TEXT)
    assert len(ids) > len(MIXED_TEXT.split())  # the CJK characters really are split across byte tokens
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.add(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(pieces) == MIXED_TEXT
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "" in pieces and "世" in pieces and " 🙂" in pieces


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_equals_full_decode_on_random_streams(tokenizer: Tokenizer,
                                                          skip_special_tokens: bool) -> None:
    rng = random.Random(7)
    for _ in range(150):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 50))]
        decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
        assert "".join(_stream(decoder, ids, rng)) == tokenizer.decode(ids, skip_special_tokens)


def test_incremental_equals_full_decode_on_real_text(tokenizer: Tokenizer) -> None:
    rng = random.Random(3)
    ids = tokenizer.encode(SENTENCE * 3 + MIXED_TEXT)
    assert "".join(_stream(tokenizer.incremental_decoder(), ids, rng)) == tokenizer.decode(ids)


def test_invalid_bytes_are_emitted_after_a_bounded_wait(tokenizer: Tokenizer) -> None:
    lead_byte = tokenizer.vocab().index(b"\xf0")  # the first byte of a 4-byte character, alone
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.add(lead_byte) for _ in range(40)]
    assert "".join(pieces) + decoder.flush() == tokenizer.decode([lead_byte] * 40) == REPLACEMENT_CHAR * 40
    assert sum(1 for p in pieces if p) >= 40 // (IncrementalDecoder.MAX_PENDING_IDS + 1)


def test_an_incomplete_character_is_flushed_at_the_end(tokenizer: Tokenizer) -> None:
    partial = tokenizer.encode("世")[:-1]
    decoder = tokenizer.incremental_decoder()
    assert decoder.add(tokenizer.encode("a") + partial) == "a"  # the complete part is not held back
    assert decoder.flush() == REPLACEMENT_CHAR and decoder.flush() == ""


def test_a_bad_id_leaves_the_decoder_usable(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MIXED_TEXT)
    decoder = tokenizer.incremental_decoder()
    text = decoder.add(ids[:5])
    with pytest.raises(ValueError, match="out of range"):
        decoder.add([ids[5], tokenizer.vocab_size])
    assert text + decoder.add(ids[5:]) + decoder.flush() == MIXED_TEXT


def test_incremental_decode_costs_constant_work_per_token(tokenizer: Tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids decoded per id fed stays bounded however long the stream (no re-decoding of the whole text)."""
    num_decoded = [0]
    decode = tokenizer._decode_checked

    def counting(ids: list[int], skip: bool) -> str:
        num_decoded[0] += len(ids)
        return decode(ids, skip)

    monkeypatch.setattr(tokenizer, "_decode_checked", counting)
    ids = tokenizer.encode((SENTENCE + MIXED_TEXT) * 40)
    decoder = tokenizer.incremental_decoder()
    text = "".join(decoder.add(token_id) for token_id in ids) + decoder.flush()
    monkeypatch.undo()
    assert text == tokenizer.decode(ids)
    assert num_decoded[0] <= 6 * len(ids)


def test_prompt_context_keeps_the_first_generated_space(sp_tokenizer: Tokenizer) -> None:
    prompt, generated = sp_tokenizer.encode("hello"), sp_tokenizer.encode(" world")[1:]
    assert sp_tokenizer.decode(generated) == "world"  # alone, the decoder strips the leading space
    decoder = sp_tokenizer.incremental_decoder(context_ids=prompt)
    assert decoder.add(generated) + decoder.flush() == " world"


# ------------------------------------------------------------------------------------ SentencePiece

def test_sentencepiece_byte_fallback_streams(sp_tokenizer: Tokenizer) -> None:
    ids = sp_tokenizer.encode(MIXED_TEXT)
    assert sp_tokenizer.id_to_token(ids[5]) == "<0xE4>"  # 世 is spelled in byte tokens
    rng = random.Random(5)
    alphabet = ["h", "e", "l", "o", " ", "é", "世", "界", "🙂", "w", "r", "d", "\n", "hello", " world"]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 20)))
        ids = sp_tokenizer.encode(text)
        pieces = _stream(sp_tokenizer.incremental_decoder(), ids, rng)
        assert "".join(pieces) == sp_tokenizer.decode(ids)
        assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_sentencepiece_token_bytes(sp_tokenizer: Tokenizer) -> None:
    table = sp_tokenizer.vocab()
    assert table[sp_tokenizer.token_to_id("<0xE4>")] == b"\xe4"
    assert table[sp_tokenizer.token_to_id("▁hello")] == b" hello"
    assert table[sp_tokenizer.token_to_id("</s>")] == b"</s>"
    assert sp_tokenizer.eos_token_ids == {sp_tokenizer.token_to_id("</s>")}


def test_invalid_bytes_then_a_completing_tail(tokenizer: Tokenizer) -> None:
    """A forced emission keeps the last ids pending: a character they start can still complete."""
    lead_byte = tokenizer.vocab().index(b"\xf0")
    ids = [lead_byte] * 12 + [tokenizer.vocab().index(bytes([b])) for b in "🙂".encode()[1:]] + [lead_byte]
    decoder = tokenizer.incremental_decoder()
    text = decoder.add(ids[:12]) + decoder.add(ids[12:]) + decoder.flush()
    assert text == tokenizer.decode(ids) == REPLACEMENT_CHAR * 11 + "🙂" + REPLACEMENT_CHAR

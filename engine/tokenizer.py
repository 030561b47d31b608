"""The tokenizer service: encode, decode (also incrementally, for streaming), chat templates, special tokens.

`Tokenizer` wraps transformers' AutoTokenizer, which reads tokenizer.json or tiktoken files and finds the chat
template in tokenizer_config.json or chat_template.jinja. Every id handed in is checked against the vocabulary
(a clear ValueError, never a silent empty string). `IncrementalDecoder` turns a stream of ids into text
pieces (`add(ids)`, then `flush()`) that never end inside a multi-byte character.
"""
from __future__ import annotations

import json
import operator
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pie_server.engine.byte_level import ByteLevelStream, byte_level_table
from pie_server.engine.types import TokenId

REPLACEMENT_CHAR = "\ufffd"
SENTENCEPIECE_SPACE = "\u2581"
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """One model's tokenizer. Build it with `Tokenizer.from_dir(model_dir)`; it keeps no per-call state."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        self._hf = hf_tokenizer
        # The Rust backend decodes ~4x faster than the Python wrapper; the wrapper is only needed when it
        # post-processes (clean_up_tokenization_spaces).
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleans_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))
        self._backend = None if cleans_up else backend
        self._id_by_token: dict[str, int] = dict(hf_tokenizer.get_vocab())
        # Ids need not be dense in exotic vocabularies: the size is one past the largest id.
        self.vocab_size: int = max(self._id_by_token.values()) + 1
        self.bos_token_id: TokenId | None = hf_tokenizer.bos_token_id
        eos_ids = {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set()
        self.eos_token_ids: frozenset[TokenId] = frozenset(eos_ids | set(self.check_ids(list(extra_eos_ids))))
        added = getattr(hf_tokenizer, "added_tokens_decoder", {})
        added_special_ids = {i for i, token in added.items() if getattr(token, "special", False)}
        self.special_token_ids: frozenset[TokenId] = frozenset(set(hf_tokenizer.all_special_ids) | added_special_ids)
        # Added tokens (special or not) as written: vLLM's spaces_between_special_tokens=false joins them raw.
        self.added_token_contents: dict[TokenId, str] = {
            i: str(getattr(token, "content", token)) for i, token in added.items()}
        self.chat_template: str | None = getattr(hf_tokenizer, "chat_template", None) or None
        self._token_bytes: list[bytes] | None = None  # built on first vocab() call
        self._byte_level: list[bytes] | None | bool = False  # byte_level_table(): False until asked

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """The tokenizer of a Hugging Face model directory (plus the eos ids of its generation_config.json)."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"no model directory at {model_dir}")
        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc
        return cls(hf_tokenizer, extra_eos_ids=_generation_eos_ids(model_dir))

    # ------------------------------------------------------------------------------------------ ids

    def check_ids(self, token_ids: int | Iterable[int]) -> list[TokenId]:
        """The ids as a list of ints; ValueError naming the first one that is not a token of this vocabulary."""
        if type(token_ids) is int and 0 <= token_ids < self.vocab_size:
            return [token_ids]  # the hot path: one sampled token (no exception raised to tell a list from an int)
        if type(token_ids) is list and len(token_ids) == 1 and type(token_ids[0]) is int \
                and 0 <= token_ids[0] < self.vocab_size:
            return [token_ids[0]]  # a streamed token, as a list: no generator to set up
        if type(token_ids) is list and all(type(t) is int and 0 <= t < self.vocab_size for t in token_ids):
            return list(token_ids)
        if isinstance(token_ids, (str, bytes)):
            raise ValueError(f"token ids must be integers, got {type(token_ids).__name__}")
        items = [token_ids] if _is_integer_like(token_ids) else list(token_ids)
        checked = []
        for item in items:
            if isinstance(item, bool) or not _is_integer_like(item):
                raise ValueError(f"token ids must be integers, got {item!r}")
            token_id = operator.index(item)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
            checked.append(token_id)
        return checked

    def token_to_id(self, token: str) -> TokenId | None:
        """The id of a token string as the vocabulary spells it (e.g. 'Ġhello', '<|im_end|>'); None if absent."""
        return self._id_by_token.get(token)

    def id_to_token(self, token_id: TokenId) -> str:
        """The vocabulary's spelling of a token (byte-level BPE spells a space 'Ġ')."""
        (checked,) = self.check_ids([token_id])
        return self._hf.convert_ids_to_tokens(checked)

    def vocab(self) -> list[bytes]:
        """Same as token_bytes()."""
        return self.token_bytes()

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id decodes to, indexed by id (b'' for ids with no token), for grammar engines.

        Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece (▁ spaces, <0xHH> byte fallback)
        vocabularies are mapped exactly; added tokens give their text.
        """
        if self._token_bytes is None:
            self._token_bytes = _token_bytes_table(self._hf, self.vocab_size, self._decoder_kinds())
        return list(self._token_bytes)

    def byte_level_table(self) -> list[bytes] | None:
        """token_bytes() when streams may be decoded from it byte by byte (engine/byte_level.py: a byte-level
        BPE decoder, no clean-up, checked on a sample), else None. Built on the first call, then kept."""
        if self._byte_level is False:
            kinds = self._decoder_kinds() if self._backend is not None else set()
            self._byte_level = byte_level_table(lambda ids: self._decode_checked(ids, False), self.token_bytes,
                                                set(self.added_token_contents), kinds)
        return self._byte_level  # type: ignore[return-value]

    def _decoder_kinds(self) -> set[str]:
        backend = getattr(self._hf, "backend_tokenizer", None)
        if backend is None:
            return set()
        return _decoder_types(json.loads(backend.to_str()).get("decoder"))

    # ---------------------------------------------------------------------------------------- text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[TokenId]:
        """Token ids of text. Special-token text (e.g. '<|im_end|>') maps to its special id."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids; an incomplete UTF-8 sequence decodes to U+FFFD."""
        checked = self.check_ids(token_ids)
        return self._decode_checked(checked, skip_special_tokens)

    def _decode_checked(self, token_ids: list[TokenId], skip_special_tokens: bool) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _decode_added_tokens_joined(self, token_ids: list[TokenId]) -> str:
        """The decode with every added token that follows another added token written raw, without what the
        decoder puts between them (vLLM's spaces_between_special_tokens=false); the text after such a run
        is decoded with the run's last token as left context, so its own leading space stays."""
        added = self.added_token_contents
        pieces: list[str] = []
        start = 0  # token_ids[start:i] is the segment not yet decoded
        for i in range(1, len(token_ids)):
            if token_ids[i] in added and token_ids[i - 1] in added:
                pieces.append(self._decode_after(token_ids[start:i], token_ids[start - 1] if start else None))
                pieces.append(added[token_ids[i]])
                start = i + 1
        pieces.append(self._decode_after(token_ids[start:], token_ids[start - 1] if start else None))
        return "".join(pieces)

    def _decode_after(self, token_ids: list[TokenId], left: TokenId | None) -> str:
        if not token_ids:
            return ""
        if left is None:
            return self._decode_checked(token_ids, False)
        return self._decode_checked([left, *token_ids], False)[len(self._decode_checked([left], False)):]

    def incremental_decoder(self, skip_special_tokens: bool = False, context_ids: Sequence[TokenId] = (),
                            spaces_between_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids,
                                  spaces_between_special_tokens=spaces_between_special_tokens)

    # ---------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a conversation (OpenAI-style messages); extra kwargs reach the template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt (completions) instead")
        _check_messages(messages)
        from jinja2 import TemplateError

        try:
            text = self._hf.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                                add_generation_prompt=add_generation_prompt, tokenize=False,
                                                **kwargs)
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected the conversation: {exc}") from exc
        if not isinstance(text, str):
            raise ValueError(f"the chat template produced {type(text).__name__}, not text")
        return text

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[TokenId]:
        """Token ids of the templated conversation (the template writes any BOS itself)."""
        text = self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDecoder:
    """Turns token ids fed one or many at a time into text pieces whose concatenation is the full decode.

    It never emits part of a multi-byte character: while the text of the pending ids ends in U+FFFD (an
    incomplete UTF-8 sequence, e.g. an emoji split across byte tokens) it emits only up to the last id that
    ends a character and keeps the rest pending. Only a window of ids is decoded: the ids of the previous
    emission as left context (decoders strip a leading space or merge byte runs, so a neighbour is needed; an
    emission boundary is a character boundary) plus the pending ids. Every id is decoded a bounded number of
    times, so the cost per id is O(1) amortised.
    """

    # A UTF-8 character is at most 4 bytes, so an incomplete one at the end of the text lies in the last
    # 3 ids (every id carries at least a byte).
    MAX_INCOMPLETE_IDS = 3
    # Pending ids whose text still ends in U+FFFD after this many are genuinely invalid bytes: they are
    # emitted as U+FFFD (all but the last MAX_INCOMPLETE_IDS, which might still complete a character).
    MAX_PENDING_IDS = 8
    # At most this many context_ids (the prompt's end) are kept as left context.
    NUM_CONTEXT_IDS = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 context_ids: Sequence[TokenId] = (), spaces_between_special_tokens: bool = True) -> None:
        """context_ids: ids that precede the stream (e.g. the prompt's end); they are never emitted.
        skip_special_tokens, spaces_between_special_tokens: vLLM's request fields (see
        Tokenizer._decode_added_tokens_joined)."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        context = tokenizer.check_ids(context_ids)
        self._added = tokenizer.added_token_contents
        self._special = tokenizer.special_token_ids
        # The byte-level fast path (engine/byte_level.py) while the stream holds no added token to print; the
        # slow path's window is set up only when the stream leaves it (from the last ids) or never takes it.
        table = tokenizer.byte_level_table()
        self._fast = None if table is None else ByteLevelStream(
            table, b"".join(table[i] for i in context[-self.NUM_CONTEXT_IDS:]))
        self._recent: list[TokenId] = context[-2 * self.NUM_CONTEXT_IDS:]  # the last ids fed to the fast path
        # Invariant (slow path): _window[:_num_read] was emitted (or is context) and decodes to _read_text, which
        # does not end inside a character; _window[_num_read:] is pending.
        self._window: list[TokenId] = []
        self._num_read = 0
        self._read_text = ""
        if self._fast is None:
            self._start_window(context)

    def _start_window(self, read_ids: list[TokenId]) -> None:
        """The slow path's window: the last of read_ids (emitted or context) as left context, nothing pending."""
        self._window = self._trimmed_context(read_ids)
        self._num_read = len(self._window)
        self._read_text = self._decode(self._window)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """The new complete text these ids add ('' while a character is still incomplete)."""
        new_ids = self._tokenizer.check_ids(token_ids)  # validated before any state changes
        if not new_ids:
            return ""
        if self._fast is not None:
            return self._add_fast(new_ids)
        return self._add_slow(new_ids)

    def _add_fast(self, new_ids: list[TokenId]) -> str:
        fast, added, pieces = self._fast, self._added, []
        assert fast is not None
        for index, token_id in enumerate(new_ids):
            if token_id in added:
                if self._skip_special_tokens and token_id in self._special:
                    continue  # dropped before decoding, as the tokenizer does: the bytes around it join
                pieces.append(self._leave_fast_path(new_ids[:index]))
                pieces.append(self._add_slow(new_ids[index:]))
                return "".join(pieces)
            pieces.append(fast.add(token_id))
        recent = self._recent
        recent.extend(new_ids)
        if len(recent) > 4 * self.NUM_CONTEXT_IDS:
            del recent[:-2 * self.NUM_CONTEXT_IDS]
        return pieces[0] if len(pieces) == 1 else "".join(pieces)

    def _leave_fast_path(self, last_ids: list[TokenId]) -> str:
        """An added token to print: the slow path from here on, its window the last ids (all emitted; an
        incomplete character they end in is emitted as U+FFFD, as the tokenizer prints it before the token)."""
        assert self._fast is not None
        text, self._fast = self._fast.flush(), None
        self._start_window([*self._recent, *last_ids])
        return text

    def _add_slow(self, new_ids: list[TokenId]) -> str:
        self._window.extend(new_ids)
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._emit(len(self._window), text)
        return self._emit_complete_prefix(force=len(self._window) - self._num_read > self.MAX_PENDING_IDS)

    def flush(self) -> str:
        """Whatever is pending, complete or not (call at the end of the stream)."""
        if self._fast is not None:
            return self._fast.flush()
        if len(self._window) == self._num_read:
            return ""
        return self._emit(len(self._window), self._decode(self._window))

    def _emit_complete_prefix(self, force: bool) -> str:
        """Emit up to the last id boundary (of the last few) whose text ends on a complete character; with
        force, up to the earliest of those boundaries even if its text ends in U+FFFD."""
        lowest = max(self._num_read + 1, len(self._window) - self.MAX_INCOMPLETE_IDS)
        for end in range(len(self._window) - 1, lowest - 1, -1):
            text = self._decode(self._window[:end])
            if not text.endswith(REPLACEMENT_CHAR) or (force and end == lowest):
                return self._emit(end, text)
        return ""

    def _emit(self, end: int, text: str) -> str:
        """Emit the text of _window[:end] beyond _read_text; those ids become the next left context."""
        new_text = text[len(self._read_text):]
        self._window = self._window[self._num_read:]
        self._num_read = end - self._num_read
        self._read_text = self._decode(self._window[:self._num_read])
        return new_text

    def _trimmed_context(self, context_ids: list[TokenId]) -> list[TokenId]:
        """The last few context ids, starting at a token that begins a character (its decode does not start
        with U+FFFD), so a byte run is never cut in the middle; the search back is bounded."""
        start = max(0, len(context_ids) - self.NUM_CONTEXT_IDS)
        lowest = max(0, start - self.NUM_CONTEXT_IDS)
        while start > lowest and self._decode(context_ids[start:start + 1]).startswith(REPLACEMENT_CHAR):
            start -= 1
        return context_ids[start:]

    def _decode(self, token_ids: list[TokenId]) -> str:
        if not self._spaces_between_special_tokens and not self._skip_special_tokens:
            return self._tokenizer._decode_added_tokens_joined(token_ids)
        return self._tokenizer._decode_checked(token_ids, self._skip_special_tokens)


# ------------------------------------------------------------------------------------------ helpers

def _is_integer_like(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} must be an object with a string 'role'")


def _generation_eos_ids(model_dir: Path) -> list[int]:
    """eos_token_id of generation_config.json (an int or a list; chat models often stop on several)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a JSON object: {exc}") from exc
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


def _decoder_types(decoder: Mapping[str, Any] | None) -> set[str]:
    """The decoder steps of a tokenizer.json, flattened: e.g. {'ByteLevel'} or {'Replace:▁', 'ByteFallback'}."""
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_types(step) for step in decoder.get("decoders", [])))
    if decoder.get("type") == "Replace":
        return {f"Replace:{decoder.get('pattern', {}).get('String', '')}"}
    return {str(decoder.get("type"))}


def _token_bytes_table(hf_tokenizer: Any, vocab_size: int, decoder_kinds: set[str]) -> list[bytes]:
    table = [b""] * vocab_size
    byte_level = "ByteLevel" in decoder_kinds
    metaspace = "Metaspace" in decoder_kinds or f"Replace:{SENTENCEPIECE_SPACE}" in decoder_kinds
    byte_fallback = "ByteFallback" in decoder_kinds
    char_to_byte = {char: byte for byte, char in enumerate(_byte_level_alphabet())}
    for token, token_id in hf_tokenizer.get_vocab().items():
        if byte_level and all(char in char_to_byte for char in token):
            table[token_id] = bytes(char_to_byte[char] for char in token)
        elif byte_fallback and (match := _BYTE_FALLBACK_TOKEN.fullmatch(token)):
            table[token_id] = bytes([int(match.group(1), 16)])
        elif metaspace:
            table[token_id] = token.replace(SENTENCEPIECE_SPACE, " ").encode()
        else:
            table[token_id] = token.encode()
    for token_id, added in getattr(hf_tokenizer, "added_tokens_decoder", {}).items():
        if token_id < vocab_size:
            table[token_id] = getattr(added, "content", str(added)).encode()
    return table


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255: printable Latin-1 bytes stand for themselves, the
    others are shifted to code points 256 and up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet = []
    num_shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + num_shifted))
            num_shifted += 1
    return alphabet

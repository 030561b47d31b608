"""app/openai/responses.py: the pre-rendered text chunks are the bytes of the chunks rendered from their dicts."""
from __future__ import annotations

import json

import pytest

from pie_server.app.openai import responses as R

TEXTS = [" hello", "", 'say "hi"', "back\\slash", "line\nbreak\ttab\r", "\x00\x1f\x7f", "é 中文 🙂", "\u2028\u2029",
         "data: [DONE]\n\n", "\x00pie-text\x00"]
META = R.ResponseMeta(id="chatcmpl-1", created=1, model='model "\x00pie-text\x00"')


@pytest.mark.parametrize("usage", [False, True])
def test_chat_content_chunks_equal_the_rendered_dicts(usage: bool) -> None:
    def render(index: int, text: str) -> str:
        body = R.chat_chunk(META, [R.chat_chunk_choice(index, {"content": text})])
        return R.sse({**body, "usage": None} if usage else body)

    chunks = R.TextChunks(render)
    for index in (0, 3, 0):
        for text in TEXTS:
            assert chunks(index, text) == render(index, text)
            assert json.loads(chunks(index, text)[len("data: "):])["choices"][0]["delta"]["content"] == text


def test_completion_text_chunks_equal_the_rendered_dicts() -> None:
    def render(index: int, text: str) -> str:
        return R.sse(R.completion(META, [R.completion_choice(index, text, None, None)], None, chunk=True))

    chunks = R.TextChunks(render)
    for text in TEXTS:
        assert chunks(1, text) == render(1, text)


def test_a_render_without_the_text_as_a_string_is_refused() -> None:
    with pytest.raises(ValueError):
        R.TextChunks(lambda index, text: R.sse({"index": index, "length": len(text)}))(0, "x")

"""Parity with vLLM's OpenAI server, tried as a client would (real server, SmolLM2-135M-Instruct, the Wasm
default inferlet): prompts of any size, skip_special_tokens, logprobs with every streamed chunk, streamed
tool calls, echo with logprobs and prompt_logprobs."""
from __future__ import annotations

import json

import openai
import pytest

from tests.app import raw_http
from tests.app.conftest import all_pages_free, client_for

MODEL = "default"
QUESTION = [{"role": "user", "content": "Name three colors."}]
ISSUE_START = 8  # a special token of SmolLM2's vocabulary: "<issue_start>"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(real_server) -> openai.OpenAI:
    return client_for(real_server, timeout=120)


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    status, out, _ = raw_http.request(server.url + path, "POST", {"model": MODEL, **body})
    return status, out


def test_prompts_beyond_the_argument_limit_get_an_answer_or_a_400(real_server, client) -> None:
    limit = real_server.engine.info.max_context_len
    # 200 KB of UTF-8, 1.2 MB as JSON arguments ("\u0001"): tokenized by the front end, the exact count in
    # vLLM's words
    prompt = "\x01" * 200_000
    num_tokens = len(raw_http.request(real_server.url + "/tokenize", "POST", {"prompt": prompt})[1]["tokens"])
    status, body = _post(real_server, "/v1/completions", {"prompt": prompt, "max_tokens": 5})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert body["error"]["message"].startswith(f"This model's maximum context length is {limit} tokens. However, "
                                               f"you requested {num_tokens + 5} tokens ({num_tokens} in the")
    # longer than any tokenization of it could fit: refused without tokenizing
    status, body = _post(real_server, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hello " * 400_000}], "stream": True})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "you requested at least" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    # big but legal: 1.2 MB of arguments (a message name the chat template does not print), a short prompt
    named = [{"role": "user", "content": "Name three colors.", "name": "x" * 1_200_000}]
    big = client.chat.completions.create(model=MODEL, messages=named, max_tokens=6, temperature=0)
    small = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0)
    assert big.choices[0].message.content == small.choices[0].message.content
    assert big.usage.prompt_tokens == small.usage.prompt_tokens
    assert all_pages_free(real_server)


def test_special_tokens_are_skipped_unless_asked(client) -> None:
    forced = {"logit_bias": {str(ISSUE_START): 100}, "temperature": 0, "max_tokens": 3}
    skipped = client.completions.create(model=MODEL, prompt="Hello", extra_body={"ignore_eos": True}, **forced)
    assert skipped.choices[0].text == "" and skipped.usage.completion_tokens == 3
    kept = client.completions.create(model=MODEL, prompt="Hello", **forced, extra_body={
        "ignore_eos": True, "skip_special_tokens": False})
    assert kept.choices[0].text == "<issue_start>" * 3
    joined = client.completions.create(model=MODEL, prompt="Hello", **forced, extra_body={
        "ignore_eos": True, "skip_special_tokens": False, "spaces_between_special_tokens": False})
    assert joined.choices[0].text == "<issue_start>" * 3  # a byte-level decoder puts no space between them
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True, **forced)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == ""
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hello", extra_body={"skip_special_tokens": "no"})


def test_streamed_logprobs_come_with_each_chunk(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    chunks = [c for c in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                                        logprobs=True, top_logprobs=2, stream=True) if c.choices]
    with_text = [c for c in chunks if c.choices[0].delta.content]
    assert len(with_text) >= 4
    for c in with_text:  # each chunk carries exactly its own tokens
        assert "".join(e.token for e in c.choices[0].logprobs.content) == c.choices[0].delta.content
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in whole.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    text = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=6, temperature=0, logprobs=1)
    parts = [c.choices[0] for c in client.completions.create(model=MODEL, prompt="One, two,", max_tokens=6,
                                                            temperature=0, logprobs=1, stream=True) if c.choices]
    offsets = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
    assert offsets == text.choices[0].logprobs.text_offset
    for part in parts:
        if part.text:
            assert "".join(part.logprobs.tokens) == part.text


def test_streamed_tool_call_arrives_as_tool_call_deltas(client) -> None:
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], max_tokens=40, temperature=0,
               tools=[WEATHER_TOOL], tool_choice="required")
    whole = client.chat.completions.create(**ask)
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) >= 3  # the header, then the arguments piece by piece
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == "" and calls[0].type == "function"
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in calls[1:])
    arguments = "".join(c.function.arguments for c in calls)
    assert json.loads(arguments) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_echo_with_logprobs_and_prompt_logprobs(real_server, client) -> None:
    prompt = "The capital of France is"
    prompt_ids = raw_http.request(real_server.url + "/tokenize", "POST", {"prompt": prompt})[1]["tokens"]
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    logprobs = out.choices[0].logprobs
    assert out.choices[0].text == prompt + first.choices[0].text
    assert len(logprobs.tokens) == len(prompt_ids) + 3 and "".join(logprobs.tokens) == out.choices[0].text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:]) and len(logprobs.top_logprobs[1]) == 2
    assert logprobs.token_logprobs[len(prompt_ids):] == pytest.approx(first.choices[0].logprobs.token_logprobs)
    assert logprobs.text_offset[len(prompt_ids)] == len(prompt)
    # The prompt pass agrees with decoding: score prompt + the greedy output, its last 3 tokens as prompt
    generated = raw_http.request(real_server.url + "/tokenize", "POST",
                                 {"prompt": prompt + first.choices[0].text})[1]["tokens"]
    status, body = _post(real_server, "/v1/completions", {"prompt": generated, "max_tokens": 1, "temperature": 0,
                                                          "echo": True, "logprobs": 0, "prompt_logprobs": 1})
    assert status == 200, body
    choice = body["choices"][0]
    if generated[:len(prompt_ids)] == prompt_ids:
        scored = choice["logprobs"]["token_logprobs"][len(prompt_ids):len(generated)]
        assert scored == pytest.approx(first.choices[0].logprobs.token_logprobs[:len(scored)], abs=1e-3)
    vllm = choice["prompt_logprobs"]
    assert len(vllm) == len(generated) and vllm[0] is None
    for token_id, entry in zip(generated[1:], vllm[1:]):
        assert str(token_id) in entry and 1 <= len(entry) <= 2
        assert all(e["rank"] in (1, None) for e in entry.values())
    # streamed: the echo chunk carries the prompt's logprobs, before any generated text
    parts = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                                            logprobs=2, echo=True, stream=True) if c.choices]
    assert parts[0].text == prompt and len(parts[0].logprobs.tokens) == len(prompt_ids)
    assert parts[0].logprobs.token_logprobs[0] is None
    assert "".join(p.text for p in parts) == out.choices[0].text
    assert all_pages_free(real_server)

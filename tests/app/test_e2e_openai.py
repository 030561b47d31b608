"""End to end: a real server (uvicorn on a loopback port) over SmolLM2-135M-Instruct, every chat and
completion request served by the default inferlet running as Wasm; driven with the official `openai`
package (sync and async) and raw HTTP."""
from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.app import raw_http
from tests.app.conftest import all_pages_free, client_for

QUESTION = [{"role": "user", "content": "Name three colors."}]
MODEL = "default"


@pytest.fixture(scope="module")
def client(real_server) -> openai.OpenAI:
    return client_for(real_server, timeout=120)


def test_chat_usage_finish_reason_and_free_pages(real_server, client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert out.usage.completion_tokens == 6
    prompt_ids = raw_http.request(real_server.url + "/tokenize", "POST", {"messages": QUESTION})[1]["tokens"]
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    long = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=200, temperature=0)
    assert long.choices[0].finish_reason == "stop" and long.usage.completion_tokens < 200
    assert all_pages_free(real_server)


def test_stream_equals_non_stream_for_greedy(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text


def test_logprobs_shapes_and_limit(client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=20)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 20 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    assert "".join(e.token for e in content) == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, logprobs=True, top_logprobs=21)
    completion = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, temperature=0, logprobs=5)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and all(len(top) == 5 for top in logprobs.top_logprobs)


def test_n3_choices_share_the_prompt(real_server, client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story " * 8}],
                                         n=3, max_tokens=8, temperature=1.0, seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # different seeds per choice
    assert 3 <= out.usage.completion_tokens <= 24
    greedy = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, max_tokens=6, temperature=0)
    single = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0)
    assert [c.message.content for c in greedy.choices] == [single.choices[0].message.content] * 3
    assert all_pages_free(real_server)


def test_stop_strings_including_multi_token(real_server, client) -> None:
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24,
                                      temperature=0).choices[0].text
    words = whole.split()
    assert len(words) > 4, whole
    stop = " ".join(words[2:4])  # two words: several tokens, never one
    stop_tokens = raw_http.request(real_server.url + "/tokenize", "POST", {"prompt": stop})[1]["tokens"]
    assert len(stop_tokens) >= 2
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24,
                                    temperature=0, stop=[stop])
    assert out.choices[0].text == whole[:whole.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24,
                                              temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole[:whole.index(stop)]
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"


def test_invalid_parameters_and_context_length(real_server, client) -> None:
    for extra in ({"temperature": -0.5}, {"n": 0}, {"top_p": 0.0}, {"max_tokens": -3}, {"logit_bias": {"x": 1}}):
        status, body, _ = raw_http.request(real_server.url + "/v1/chat/completions", "POST",
                                           {"model": MODEL, "messages": QUESTION, **extra})
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (extra, body)
    max_len = real_server.engine.info.max_context_len
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hello " * max_len, max_tokens=4)
    assert "maximum context length" in err.value.message
    assert all_pages_free(real_server)


def test_multi_turn_chat_reuses_earlier_pages(client) -> None:
    system = {"role": "system", "content": "You are a terse assistant who answers in one short sentence. " * 3}
    first_turn = [system, {"role": "user", "content": "What is two plus two?"}]
    first = client.chat.completions.create(model=MODEL, messages=first_turn, max_tokens=16, temperature=0)
    second_turn = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                                {"role": "user", "content": "And three plus three?"}]
    second = client.chat.completions.create(model=MODEL, messages=second_turn, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    page_size = 16
    # The whole first prompt (page-aligned) was reused, not re-prefilled.
    assert cached >= first.usage.prompt_tokens // page_size * page_size > 0


def test_async_client_concurrent_requests(real_server) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [f"Count from {i} to {i + 5}:" for i in range(6)]
        outs = await asyncio.gather(*[client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
                                      for p in prompts])
        alone = await client.completions.create(model=MODEL, prompt=prompts[3], max_tokens=6, temperature=0)
        await client.close()
        assert outs[3].choices[0].text == alone.choices[0].text  # batched == alone
        return [o.choices[0].text for o in outs]

    assert all(asyncio.run(main()))
    assert all_pages_free(real_server)


def test_stream_disconnect_frees_pages(real_server, client) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=400, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert [next(stream) for _ in range(3)]
    stream.close()
    assert all_pages_free(real_server)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}


def test_json_schema_output_validates(real_server, client) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 20
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    assert out.choices[0].finish_reason == "stop"
    anything = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                              max_tokens=40, temperature=0, response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")
    status, body, _ = raw_http.request(real_server.url + "/v1/chat/completions", "POST", {
        "model": MODEL, "messages": QUESTION,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert status == 400 and body["error"]["param"] == "response_format"
    assert all_pages_free(real_server)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call(client, tool_choice) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=40,
        temperature=0, tools=[WEATHER_TOOL], tool_choice=tool_choice)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_forced_tool_call_streamed(client) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], max_tokens=40, temperature=0,
        tools=[WEATHER_TOOL], tool_choice="required", stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and all(call.index == 0 for call in calls)
    assert json.loads("".join(call.function.arguments for call in calls))["city"]  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_n3_forks_share_the_prompt_pages(real_server, client) -> None:
    """Peak page use proves the prompt is held once: 3 private copies would need ~30 more pages."""
    import threading
    import time

    control = real_server.engine.control
    base = control.stats().num_pages - control.stats().num_free_pages
    peak = {"used": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            stats = control.stats()
            peak["used"] = max(peak["used"], stats.num_pages - stats.num_free_pages - base)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        prompt = " ".join(f"word{i}" for i in range(120))  # ~240 tokens: 15 pages of 16
        out = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
    finally:
        done.set()
        watcher.join()
    num_prompt_pages = out.usage.prompt_tokens // 16
    assert num_prompt_pages >= 12 and out.usage.completion_tokens == 72
    # shared: prompt pages once + per choice (tail page + 2 output pages); private copies: 3x the prompt
    assert 0 < peak["used"] <= num_prompt_pages + 3 * 4 + 2, (peak, num_prompt_pages)
    assert all_pages_free(real_server)

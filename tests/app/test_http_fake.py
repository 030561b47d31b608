"""The HTTP surface over a fake engine: shapes, parameters, validation, streaming, auth, metrics.

The fake inferlet replies with REPLY (one token per byte) cut to max_tokens, so expected texts are known.
"""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.app import raw_http
from tests.app.conftest import client_for
from tests.app.fake_engine import REPLY

MESSAGES = [{"role": "user", "content": "Hi"}]
PROMPT_TOKENS = len("<user>Hi\n<assistant>")


def test_health_models_version_openapi(fake_server) -> None:
    assert raw_http.request(fake_server.url + "/health")[:2] == (200, {"status": "ok"})
    models = client_for(fake_server).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    status, body, _ = raw_http.request(fake_server.url + "/version")
    assert status == 200 and body["version"]
    status, body, _ = raw_http.request(fake_server.url + "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in body["paths"]


def test_chat_non_stream_usage_and_finish_reason(fake_server) -> None:
    out = client_for(fake_server).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=7)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == REPLY[:7]
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (PROMPT_TOKENS, 7, PROMPT_TOKENS + 7)
    launched = fake_server.engine.runtime.arguments[-1]
    # the front end renders the chat template and tokenizes (app/openai/prompt_fit.py): the inferlet gets ids
    assert launched["max_tokens"] == 7 and launched["prompts"] == [{"token_ids": list(b"<user>Hi\n<assistant>")}]


def test_stream_equals_non_stream_and_include_usage(fake_server) -> None:
    client = client_for(fake_server)
    whole = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing_ends_with_done(fake_server) -> None:
    events = raw_http.sse_events(fake_server.url + "/v1/completions",
                                 {"model": "fake-model", "prompt": "x", "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == REPLY[:3]
    assert all("usage" not in e for e in events[:-1])


def test_n_choices(fake_server) -> None:
    out = client_for(fake_server).chat.completions.create(model="fake-model", messages=MESSAGES, n=3, max_tokens=4)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.message.content == REPLY[:4] for c in out.choices)
    assert out.usage.completion_tokens == 12
    chunks = list(client_for(fake_server).chat.completions.create(
        model="fake-model", messages=MESSAGES, n=3, max_tokens=4, stream=True))
    for index in range(3):
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == index) == REPLY[:4]


def test_logprobs_shapes(fake_server) -> None:
    out = client_for(fake_server).chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)
    assert "".join(entry.token for entry in content) == REPLY[:5]
    completion = client_for(fake_server).completions.create(model="fake-model", prompt="a", max_tokens=4, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert logprobs.text_offset == [0, 1, 2, 3]
    no_logprobs = client_for(fake_server).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    assert no_logprobs.choices[0].logprobs is None


def test_top_logprobs_limit_is_20(fake_server) -> None:
    client = client_for(fake_server)
    client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1, logprobs=True, top_logprobs=20)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1, logprobs=True,
                                       top_logprobs=21)
    assert err.value.status_code == 400 and err.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize("extra, param", [
    ({"temperature": -1}, "temperature"), ({"n": 0}, "n"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"), ({"stop": 5}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"tool_choice": "required"}, "tool_choice"), ({"response_format": {"type": "xml"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_invalid_parameters_are_400(fake_server, extra, param) -> None:
    status, body, _ = raw_http.request(fake_server.url + "/v1/chat/completions", "POST",
                                       {"model": "fake-model", "messages": MESSAGES, **extra})
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert body["error"]["message"]


def test_bad_bodies_unknown_model_and_routes(fake_server) -> None:
    url = fake_server.url + "/v1/chat/completions"
    status, body, _ = raw_http.request(url, "POST", raw_body=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    assert raw_http.request(url, "POST", [1, 2])[0] == 400
    status, body, _ = raw_http.request(url, "POST", raw_body=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"]["message"] == "the request body is nested too deeply"
    status, body, _ = raw_http.request(url, "POST", {"model": "gpt-9", "messages": MESSAGES})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = raw_http.request(fake_server.url + "/v1/nothing")
    assert status == 404 and "error" in body
    assert raw_http.request(url)[0] == 405


def test_unknown_fields_are_ignored(fake_server) -> None:
    status, body, _ = raw_http.request(fake_server.url + "/v1/chat/completions", "POST", {
        "model": "fake-model", "messages": MESSAGES, "max_tokens": 2, "some_future_field": {"x": 1},
        "user": "u-1", "parallel_tool_calls": True})
    assert status == 200 and body["choices"][0]["message"]["content"] == REPLY[:2]


def test_prompt_too_long_is_400(fake_server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client_for(fake_server).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x" * 600}], max_tokens=2)
    assert "maximum context length" in err.value.message
    status, body, _ = raw_http.request(fake_server.url + "/v1/completions", "POST",
                                       {"prompt": "x" * 600, "stream": True})
    assert status == 400 and "maximum context length" in body["error"]["message"]


def test_stop_strings_and_sampling_params_reach_the_inferlet(fake_server) -> None:
    out = client_for(fake_server).chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=30, stop=["brown"], temperature=0.5, top_p=0.9,
        seed=7, presence_penalty=0.1, frequency_penalty=0.2, logit_bias={"65": 3},
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "stop_token_ids": [10]})
    assert out.choices[0].message.content == "The quick " and out.choices[0].finish_reason == "stop"
    sent = fake_server.engine.runtime.arguments[-1]
    assert sent["sampling"] == {"temperature": 0.5, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "seed": 7,
                                "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
                                "logit_bias": [[65, 3.0]], "num_logprobs": None}
    assert (sent["stop"], sent["stop_token_ids"], sent["ignore_eos"]) == (["brown"], [10], True)


def test_completions_prompts_echo_and_token_ids(fake_server) -> None:
    client = client_for(fake_server)
    out = client.completions.create(model="fake-model", prompt=["ab", "cd"], n=2, max_tokens=3, echo=True)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in out.choices}
    assert texts[0] == "ab" + REPLY[:3] and texts[3] == "cd" + REPLY[:3]
    assert out.usage.prompt_tokens == 4
    out = client.completions.create(model="fake-model", prompt=[72, 105], max_tokens=2, echo=True)
    assert out.choices[0].text == "Hi" + REPLY[:2]
    default = client.completions.create(model="fake-model", prompt="q")
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_async_client(fake_server) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=fake_server.url + "/v1", api_key="none", max_retries=0)
        outs = await asyncio.gather(*[client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=3 + i) for i in range(5)])
        stream = await client.completions.create(model="fake-model", prompt="x", max_tokens=4, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        await client.close()
        return [o.choices[0].message.content for o in outs] + [streamed]

    texts = asyncio.run(main())
    assert texts == [REPLY[:3 + i] for i in range(5)] + [REPLY[:4]]


def test_tokenize_detokenize(fake_server) -> None:
    status, body, _ = raw_http.request(fake_server.url + "/tokenize", "POST", {"prompt": "Hi"})
    assert status == 200 and body["tokens"] == [72, 105] and body["count"] == 2 and body["max_model_len"] == 512
    status, body, _ = raw_http.request(fake_server.url + "/tokenize", "POST", {"messages": MESSAGES})
    assert status == 200 and body["count"] == PROMPT_TOKENS
    status, body, _ = raw_http.request(fake_server.url + "/detokenize", "POST", {"tokens": [72, 105]})
    assert status == 200 and body["prompt"] == "Hi"
    assert raw_http.request(fake_server.url + "/detokenize", "POST", {"tokens": [99999]})[0] == 400


def test_metrics(fake_server) -> None:
    client_for(fake_server).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3,
                                                     stream=True).close()
    client_for(fake_server).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
    status, text, headers = raw_http.request(fake_server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_sum",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total"):
        assert f"pie:{name}{{" in text, name
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pie:") and "_bucket" not in line}
    assert samples["pie:generation_tokens_total"] >= 3 and samples["pie:prompt_tokens_total"] >= PROMPT_TOKENS
    assert samples["pie:time_to_first_token_seconds_count"] >= 1
    assert samples["pie:prefix_cache_hits_total"] == 16
    assert samples["pie:num_preemptions_total"] == 0

"""The contrib inferlets preinstalled under their folder names (app/preinstalled.py): found at start, built on
first use (once, however many ask), listed with their status meanwhile, shadowed by a tenant's own upload of the
same name; text-completion's answer to the OpenAI protocol (openai_request.py) on the fake host; and the chat and
completion routes to it through the `openai` package on a real server."""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pie_server.app.inferlet_build import BuildError
from pie_server.app.inferlet_store import BUILTIN_TENANT, InferletStore
from pie_server.app.preinstalled import PreinstalledInferlets, discover
from pie_server.inferlets import CONTRIB_DIR
from tests.app import raw_http
from tests.app.conftest import all_pages_free, client_for

TEXT_COMPLETION = CONTRIB_DIR / "text-completion"
KEYS = (("key-of-alice", "alice"), ("key-of-bob", "bob"))
A = {"Authorization": "Bearer key-of-alice"}
B = {"Authorization": "Bearer key-of-bob"}

pytestmark = pytest.mark.timeout(900)


def _contrib_names() -> set[str]:
    return {p.name for p in CONTRIB_DIR.iterdir() if (p / "main.py").is_file()}


# -- discovery and lazy builds ------------------------------------------------------------------------------------

def test_discovery_takes_every_python_folder_under_a_valid_name(tmp_path: Path) -> None:
    for name in ("beam-search", "default", "no-python", "bad name", "z.agent"):
        (tmp_path / name).mkdir()
    for name in ("beam-search", "default", "bad name", "z.agent"):
        (tmp_path / name / "main.py").write_text("def main(args):\n    pass\n")
    (tmp_path / "no-python" / "README.md").write_text("a Rust example")
    (tmp_path / "loose.py").write_text("def main(args):\n    pass\n")
    found = discover(tmp_path, reserved={"default"})
    assert found == {"beam-search": tmp_path / "beam-search", "z.agent": tmp_path / "z.agent"}
    assert discover(tmp_path / "missing") == {}
    assert set(discover(CONTRIB_DIR)) == _contrib_names() and "text-completion" in _contrib_names()


def test_one_build_serves_every_waiter_and_a_failure_is_tried_again(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    release = threading.Event()

    def fake_build(source: Path, out: Path, cache_dir: Any = None, use_cache: bool = True, *,
                   progress: bool = True) -> Path:
        calls.append(source.name)
        release.wait(10)
        if source.name == "broken":
            raise BuildError("componentize-py failed: SyntaxError")
        out.write_bytes(f"component of {source.name}".encode())
        return out

    monkeypatch.setattr("pie_server.app.preinstalled.build_inferlet", fake_build)
    store = InferletStore(tmp_path / "store")
    preinstalled = PreinstalledInferlets(store, {"tc": tmp_path / "tc", "broken": tmp_path / "broken"})

    async def scenario() -> None:
        assert preinstalled.entry("tc")["status"] == "not_built" and preinstalled.entry("tc")["id"] is None
        waiters = [asyncio.ensure_future(preinstalled.ensure("tc")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert preinstalled.entry("tc")["status"] == "building"
        waiters[0].cancel()  # a request that went away: the build goes on for the others
        await asyncio.sleep(0.05)
        release.set()
        records = await asyncio.gather(*waiters[1:])
        assert records[0] == records[1] and calls == ["tc"]
        assert records[0].id == hashlib.sha256(b"component of tc").hexdigest()
        assert store.get("tc", "anyone") == records[0] and records[0].tenant == BUILTIN_TENANT
        assert preinstalled.entry("tc") == records[0].public() and records[0].public()["status"] == "ready"
        assert await preinstalled.ensure("tc") == records[0] and calls == ["tc"]  # built once
        for _ in range(2):
            with pytest.raises(BuildError, match="SyntaxError"):
                await preinstalled.ensure("broken")
            entry = preinstalled.entry("broken")
            assert entry["status"] == "failed" and "SyntaxError" in entry["error"]
        assert calls == ["tc", "broken", "broken"]  # a failed build is tried again on the next use

    asyncio.run(scenario())


# -- on a fresh server (fake engine: nothing is run) ---------------------------------------------------------------

def test_a_fresh_server_is_ready_at_once_and_lists_every_contrib_inferlet(make_fake_server, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("PIE_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing built before
    server = make_fake_server()  # ready (/health 200) is waited for
    listed = {r["name"]: r for r in raw_http.request(server.url + "/v1/inferlets")[1]["data"]}
    assert set(listed) == {"default"} | _contrib_names()
    for name in _contrib_names():
        assert listed[name] == {"object": "inferlet", "id": None, "name": name, "size": None, "created": None,
                                "builtin": True, "status": "not_built"}
    assert listed["default"]["status"] == "ready" and listed["default"]["builtin"] is True
    assert not list((tmp_path / "empty-cache").rglob("*.wasm"))  # no build at start, nor for the listing
    status, one, _ = raw_http.request(server.url + "/v1/inferlets/text-completion")
    assert status == 200 and one["status"] == "not_built"
    status, body, _ = raw_http.request(server.url + "/v1/inferlets/text-completion", "DELETE")
    assert status == 403 and "built-in" in body["error"]["message"]


def test_a_tenants_upload_shadows_a_preinstalled_inferlet_for_that_tenant(make_fake_server, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("PIE_CACHE_DIR", str(tmp_path / "empty-cache"))
    server = make_fake_server(api_keys=KEYS)
    status, mine, _ = raw_http.request(server.url + "/v1/inferlets?name=text-completion", "POST",
                                       raw_body=b"alice's own text-completion", headers=A)
    assert status == 201

    def seen_by(headers: dict[str, str]) -> dict[str, Any]:
        listed = [r for r in raw_http.request(server.url + "/v1/inferlets", headers=headers)[1]["data"]
                  if r["name"] == "text-completion"]
        assert len(listed) == 1
        assert raw_http.request(server.url + "/v1/inferlets/text-completion", headers=headers)[1] == listed[0]
        return listed[0]

    assert seen_by(A)["id"] == mine["id"] and seen_by(A)["builtin"] is False
    assert seen_by(B)["builtin"] is True and seen_by(B)["status"] == "not_built"
    assert raw_http.request(server.url + "/v1/inferlets/text-completion", "DELETE", headers=B)[0] == 403
    status, ran, _ = raw_http.request(server.url + "/v1/chat/completions", "POST", {
        "model": "inferlet:text-completion", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=A)
    assert status == 200 and ran["choices"]  # alice's own, which the fake runtime runs as any bytes
    assert raw_http.request(server.url + "/v1/inferlets/text-completion", "DELETE", headers=A)[0] == 200
    assert seen_by(A)["builtin"] is True  # the preinstalled one is hers again
    assert not list((tmp_path / "empty-cache").rglob("*.wasm"))


def test_a_start_drops_built_in_records_no_folder_ships_and_bytes_nothing_names(make_fake_server, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    monkeypatch.setenv("PIE_CACHE_DIR", str(tmp_path / "empty-cache"))
    uploads = tmp_path / "uploads"
    store = InferletStore(uploads)
    gone = store.put(b"an example whose folder was removed", "gone-example", BUILTIN_TENANT)
    earlier = store.put(b"text-completion as an earlier start built it", "text-completion", BUILTIN_TENANT)
    rebuilt = store.put(b"text-completion rebuilt from changed sources", "text-completion", BUILTIN_TENANT)
    assert not (uploads / "wasm" / f"{earlier.id}.wasm").exists()  # no record names those bytes any more
    make_fake_server(inferlet_dir=uploads)
    assert store.find("gone-example", BUILTIN_TENANT) is None and not (uploads / "wasm" / f"{gone.id}.wasm").exists()
    assert store.find("text-completion", BUILTIN_TENANT) == rebuilt  # a shipped name: replaced when built here


# -- text-completion speaks the OpenAI protocol (fake host, plain CPython) -----------------------------------------

@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    from tests.inferlets.fake_host import load_sdk

    return load_sdk(tmp_path_factory.mktemp("bindings"))


def _request(prompts: list[dict[str, Any]], n: int = 1, max_tokens: int | None = 6) -> str:
    return json.dumps({"version": 1, "prompts": prompts, "n": n, "max_tokens": max_tokens,
                       "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None,
                                    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                                    "logit_bias": [], "num_logprobs": None},
                       "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None})


def _run_text_completion(sdk: ModuleType, monkeypatch, arguments: list[str], inbox: list[str]) -> Any:
    from tests.inferlets.fake_host import FakeHost

    monkeypatch.syspath_prepend(str(TEXT_COMPLETION))  # main imports openai_request from its folder
    spec = importlib.util.spec_from_file_location("text_completion_main", TEXT_COMPLETION / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    host = FakeHost(arguments=arguments, inbox=list(inbox))
    host.install(monkeypatch)
    sdk.model_info.cache_clear()
    sdk.export(module.main)().run()
    return host


def test_text_completion_answers_an_openai_request(sdk: ModuleType, monkeypatch) -> None:
    """Two prompts (a chat and a text), two choices each: the prompt event, then (after "go") each choice's
    text on channel prompt * n + j, then the result; every page freed."""
    prompts = [{"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
               {"text": "abc", "prefix_token_ids": [1]}]
    host = _run_text_completion(sdk, monkeypatch, [_request(prompts, n=2)], ["go"])
    prompt, result = (json.loads(e) for e in host.events)
    assert prompt == {"type": "prompt", "prompt_tokens": [len("<user>Hi\n<assistant>"), 4], "max_tokens": [6, 6]}
    assert result["type"] == "result" and result["cached_tokens"] == [0, 0]
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    for choice in result["choices"]:
        streamed = "".join(text for channel, text in host.sent if channel == choice["index"])
        assert streamed == choice["text"] and len(streamed) == 6
        assert choice["finish_reason"] == "length" and choice["num_tokens"] == 6 and choice["logprobs"] is None
    assert result["choices"][0]["text"] == result["choices"][1]["text"] != result["choices"][2]["text"]
    assert host.num_used_pages == 0


def test_text_completion_refuses_what_does_not_fit_and_waits_for_go(sdk: ModuleType, monkeypatch) -> None:
    from tests.inferlets.fake_host import MAX_CONTEXT

    too_long = _request([{"token_ids": [65] * 10}], max_tokens=MAX_CONTEXT)
    host = _run_text_completion(sdk, monkeypatch, [too_long], ["go"])
    [error] = [json.loads(e) for e in host.events]
    assert error["type"] == "error" and error["status"] == 400 and error["code"] == "context_length_exceeded"
    assert host.inbox == ["go"]  # never asked for it
    host = _run_text_completion(sdk, monkeypatch, [_request([{"token_ids": [65, 66]}])], [])  # no "go" comes
    assert [json.loads(e)["type"] for e in host.events] == ["prompt"] and host.sent == []
    cli = _run_text_completion(sdk, monkeypatch, ["--prompt", "abc", "--max-tokens", "5"], [])
    assert len("".join(text for _, text in cli.sent)) == 5 and cli.events == []  # the command line as before


# -- the OpenAI routes to it on a real server, through the openai package ----------------------------------------

QUESTION = [{"role": "user", "content": "Name three colors."}]


def test_chat_and_completions_through_the_openai_package(real_server) -> None:
    """"model": "inferlet:text-completion" on a server where nobody uploaded it: built on this first use. Greedy,
    so its answers equal the default inferlet's (the same prompt tokens, the same engine)."""
    client = client_for(real_server, timeout=600)
    chat = client.chat.completions.create(model="inferlet:text-completion", messages=QUESTION, max_tokens=8,
                                          temperature=0)
    served = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=8, temperature=0)
    assert chat.model == "inferlet:text-completion" and chat.choices[0].message.content.strip()
    assert chat.choices[0].message.content == served.choices[0].message.content
    assert chat.usage.prompt_tokens == served.usage.prompt_tokens and chat.usage.completion_tokens == 8
    assert chat.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(model="inferlet:text-completion", messages=QUESTION, max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens

    two = client.chat.completions.create(model="inferlet:text-completion", messages=QUESTION, max_tokens=4, n=2,
                                         temperature=1.0, seed=7)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)

    prompt = "The capital of France is"
    completion = client.completions.create(model="inferlet:text-completion", prompt=prompt, max_tokens=8,
                                           temperature=0)
    assert completion.choices[0].text.strip()
    assert completion.choices[0].text == client.completions.create(model="default", prompt=prompt, max_tokens=8,
                                                                   temperature=0).choices[0].text
    assert all_pages_free(real_server)


def test_runs_of_the_preinstalled_inferlet_and_its_listing(real_server) -> None:
    run = raw_http.request(real_server.url + "/v1/inferlets/text-completion/runs", "POST",
                           {"args": ["--prompt", "The capital of France is", "--max-tokens", "8"]}, timeout=600)[1]
    assert run["status"] == "finished" and "".join(run["messages"]).strip()
    listed = {r["name"]: r for r in raw_http.request(real_server.url + "/v1/inferlets")[1]["data"]}
    entry = listed["text-completion"]
    assert entry["builtin"] is True and entry["status"] == "ready" and run["inferlet_id"] == entry["id"]
    assert raw_http.request(f"{real_server.url}/v1/inferlets/{entry['id']}")[1] == entry
    assert raw_http.request(f"{real_server.url}/v1/inferlets/{entry['id']}", "DELETE")[0] == 403

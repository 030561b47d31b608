"""Tenancy per API key over the fake engine: each key's inferlets and runs are its own (another tenant's are 404,
as if they did not exist), the built-in default inferlet serves every tenant, the tenant (never the key) reaches
the runtime; the keys' configuration (`--api-key`, `--api-keys-file`) and the runs' "limits" object."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pie_server.app.auth import key_tenant, read_keys_file
from pie_server.app.config import ServerConfig
from pie_server.app.preinstalled import discover
from pie_server.inferlets import CONTRIB_DIR
from tests.app import raw_http
from tests.app.conftest import client_for
from tests.app.server_thread import ServerThread

KEYS = (("key-of-alice", "alice"), ("key-of-bob", "bob"))
A = {"Authorization": "Bearer key-of-alice"}
B = {"x-api-key": "key-of-bob"}
MESSAGES = [{"role": "user", "content": "Hi"}]
REQUEST = json.dumps({"version": 1, "prompts": [{"token_ids": [1, 2, 3]}], "n": 1, "max_tokens": 4,
                      "sampling": {"num_logprobs": None}, "stop": []})  # what the fake inferlet reads


def _recording_tenants(server: ServerThread) -> list[str]:
    """The tenant of every launch from now on, as the runtime gets it."""
    tenants: list[str] = []
    runtime = server.engine.runtime  # type: ignore[attr-defined]
    launch = runtime.launch
    runtime.launch = lambda program, arguments, tenant: (tenants.append(tenant), launch(program, arguments, tenant))[1]
    return tenants


def _upload(server: ServerThread, wasm: bytes, name: str, headers: dict[str, str]) -> tuple[int, Any]:
    status, body, _ = raw_http.request(f"{server.url}/v1/inferlets?name={name}", "POST", raw_body=wasm,
                                       headers={"content-type": "application/wasm", **headers})
    return status, body


def test_another_tenants_inferlet_is_not_there(make_fake_server) -> None:
    from websockets.sync.client import connect

    server = make_fake_server(api_keys=KEYS)
    status, mine = _upload(server, b"alice's component", "mine", A)
    assert status == 201 and mine["builtin"] is False
    for ref in ("mine", mine["id"]):
        assert raw_http.request(f"{server.url}/v1/inferlets/{ref}", headers=B)[0] == 404
        assert raw_http.request(f"{server.url}/v1/inferlets/{ref}/runs", "POST", {"args": [REQUEST]},
                                headers=B)[0] == 404
        status, body, _ = raw_http.request(f"{server.url}/v1/inferlets/{ref}", "DELETE", headers=B)
        assert status == 404 and body["error"]["code"] == "inferlet_not_found"
    listed = {r["name"]: r for r in raw_http.request(server.url + "/v1/inferlets", headers=B)[1]["data"]}
    assert set(listed) == {"default"} | set(discover(CONTRIB_DIR))  # the built-in ones only
    assert all(r["builtin"] for r in listed.values())
    status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST",
                                       {"model": "inferlet:mine", "messages": MESSAGES}, headers=B)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    with connect(server.url.replace("http://", "ws://") + "/v1/inferlets/mine/ws", open_timeout=30,
                 additional_headers=B) as ws:
        ws.send(json.dumps({"args": [REQUEST]}))
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "inferlet_not_found"
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", headers=A)[1]["id"] == mine["id"]
    assert _upload(server, b"bob's own component", "mine", B)[0] == 201  # the same name: bob's own
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", headers=A)[1]["id"] == mine["id"]
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", headers=B)[1]["id"] \
        == hashlib.sha256(b"bob's own component").hexdigest()
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", "DELETE", headers=A)[0] == 200
    assert raw_http.request(f"{server.url}/v1/inferlets/mine", headers=B)[0] == 200


def test_the_default_inferlet_is_everyones_and_nobody_deletes_it(make_fake_server) -> None:
    server = make_fake_server(api_keys=KEYS)
    tenants = _recording_tenants(server)
    for key in ("key-of-alice", "key-of-bob"):
        client = client_for(server, api_key=key)
        assert client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2).choices
        assert client.chat.completions.create(model="inferlet:default", messages=MESSAGES, max_tokens=2).choices
    assert tenants == ["alice", "alice", "bob", "bob"]
    status, body, _ = raw_http.request(f"{server.url}/v1/inferlets/default", "DELETE", headers=A)
    assert status == 403 and "built-in" in body["error"]["message"]
    assert raw_http.request(f"{server.url}/v1/inferlets/default", headers=B)[0] == 200


def test_a_tenants_runs_are_its_own(make_fake_server) -> None:
    from websockets.sync.client import connect

    server = make_fake_server(api_keys=KEYS)
    assert _upload(server, b"alice's component", "mine", A)[0] == 201
    with connect(server.url.replace("http://", "ws://") + "/v1/inferlets/mine/ws", open_timeout=30,
                 additional_headers=A) as ws:
        ws.send(json.dumps({"args": [REQUEST]}))
        run_id = json.loads(ws.recv(timeout=30))["id"]
        assert raw_http.request(f"{server.url}/v1/runs/{run_id}", headers=B)[0] == 404
        assert raw_http.request(f"{server.url}/v1/runs/{run_id}", "DELETE", headers=B)[0] == 404
        assert raw_http.request(server.url + "/v1/runs", headers=B)[1]["data"] == []
        assert [r["id"] for r in raw_http.request(server.url + "/v1/runs", headers=A)[1]["data"]] == [run_id]
        ws.send("go")  # the fake inferlet waits for it, then answers and ends
        frames = [json.loads(ws.recv(timeout=30))]
        while frames[-1]["type"] != "done":
            frames.append(json.loads(ws.recv(timeout=30)))
    assert frames[-1]["status"] == "finished"
    assert raw_http.request(f"{server.url}/v1/runs/{run_id}", headers=A)[1]["status"] == "finished"


def test_a_key_without_a_name_is_a_tenant_named_after_its_hash(make_fake_server) -> None:
    server = make_fake_server(api_key="k1")
    tenants = _recording_tenants(server)
    client_for(server, api_key="k1").chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1)
    assert tenants == [key_tenant("k1")] and tenants[0] == "key-" + hashlib.sha256(b"k1").hexdigest()[:12]
    assert raw_http.request(server.url + "/v1/models", headers={"Authorization": "Bearer k2"})[0] == 401


def test_without_keys_every_request_is_the_default_tenant(make_fake_server) -> None:
    server = make_fake_server()
    tenants = _recording_tenants(server)
    client_for(server).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1)
    assert tenants == [ServerConfig().tenant]


def test_keys_file_and_config_checks(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-one alice\n\nsk-two   alice\nsk-three\n")
    assert read_keys_file(keys) == (("sk-one", "alice"), ("sk-two", "alice"), ("sk-three", key_tenant("sk-three")))
    keys.write_text("sk-one alice\nsk-secret bob extra\n")
    with pytest.raises(ValueError, match=":2:") as bad:
        read_keys_file(keys)
    assert "sk-secret" not in str(bad.value)  # errors never show a key
    with pytest.raises(ValueError, match="two tenants"):
        ServerConfig(api_keys=(("k", "alice"), ("k", "bob")))
    with pytest.raises(ValueError, match="tenant name"):
        ServerConfig(api_keys=(("k", "../etc"),))
    config = ServerConfig(api_keys=KEYS)
    assert ServerConfig.from_json(config.to_json()) == config


def test_serve_flags_for_keys_quotas_and_the_cache(tmp_path: Path) -> None:
    import argparse

    from pie_server.app.commands import serve

    keys = tmp_path / "keys"
    keys.write_text("sk-file carol\n")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--api-key", "sk-a", "--api-key", "", "--api-keys-file", str(keys),
                              "--tenant-max-instances", "3", "--tenant-max-pages", "100", "--compile-cache-mib", "64"])
    assert serve._api_keys(args) == (("sk-a", key_tenant("sk-a")), ("sk-file", "carol"))
    limits = serve._runtime_limits(args, num_front_ends=2)  # each front end enforces its share
    assert (limits["max_instances_per_tenant"], limits["max_pages_per_tenant"]) == (2, 50)
    assert limits["compile_cache_bytes"] == 64 << 20
    defaults = serve._runtime_limits(parser.parse_args([]), num_front_ends=1)
    assert defaults["max_instances_per_tenant"] is None and defaults["max_pages_per_tenant"] is None
    assert defaults["compile_cache_bytes"] == 2048 << 20
    assert serve._api_keys(parser.parse_args([])) == ()


@pytest.mark.parametrize("limits, param", [
    (5, "limits"),
    ({"time_budget_s": 0}, "limits.time_budget_s"),
    ({"time_budget_s": "10"}, "limits.time_budget_s"),
    ({"memory_mib": 1.5}, "limits.memory_mib"),
    ({"max_pages": True}, "limits.max_pages"),
    ({"max_pages": -2}, "limits.max_pages"),
    ({"cpu": 1}, "limits.cpu"),
])
def test_malformed_run_limits_are_400_naming_the_field(fake_server, limits: Any, param: str) -> None:
    if raw_http.request(fake_server.url + "/v1/inferlets/some")[0] == 404:
        assert _upload(fake_server, b"some component", "some", {})[0] == 201
    status, body, _ = raw_http.request(f"{fake_server.url}/v1/inferlets/some/runs", "POST",
                                       {"args": [REQUEST], "limits": limits})
    assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_a_program_evicted_from_the_compile_cache_is_loaded_again(make_fake_server) -> None:
    """The runtime raises KeyError for a program whose compiled code it evicted (engine/runtime/programs.py):
    the app loads the inferlet's stored bytes again and launches."""
    server = make_fake_server()
    assert _upload(server, b"an uploaded component", "up", {})[0] == 201
    runtime = server.engine.runtime  # type: ignore[attr-defined]
    launch, evicted = runtime.launch, [True]

    def launch_after_eviction(program: str, arguments: list[str], tenant: str) -> Any:
        if evicted:  # the first launch only
            evicted.pop()
            raise KeyError(program)
        return launch(program, arguments, tenant)

    runtime.launch = launch_after_eviction
    num_loaded = len(runtime.loaded)
    status, body, _ = raw_http.request(server.url + "/v1/chat/completions", "POST",
                                       {"model": "inferlet:up", "messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and body["choices"]
    assert runtime.loaded[num_loaded:] == [b"an uploaded component"]

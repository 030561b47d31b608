"""The data-parallel replicas, checked without a Docker engine (none runs in CI; docs/deploy.md, "Replicas"):
compose.replicas.yaml alone and merged over compose.yaml against the Compose Specification's JSON schema and
against compose.yaml's GPU server, deploy/haproxy.cfg against the replica services and the server's routes,
deploy/prometheus-replicas.yml against both, and the affinity header as the openai SDK sends it."""
from __future__ import annotations

import copy
import http.server
import json
import re
import shlex
import threading
from functools import cache
from typing import Any

import jsonschema
import openai
import yaml

from pie_server.app.auth import OPEN_PATHS
from pie_server.app.errors import ApiError
from tests.test_deploy import (DEPLOY, GPU_SERVICE, MONITORING, REPO_ROOT, _bind_mounts, _compose, _compose_file,
                               _container_port, _server_args, _service)

REPLICAS_FILE, LB_SERVICE = "compose.replicas.yaml", "lb"
_REPLICA = re.compile(r"pie-(\d+)")  # pie-N: the replica on the GPU of device id N


# -- loading ------------------------------------------------------------------------------------------------

def _merged(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """`docker compose -f BASE -f OVERRIDE`: Compose's merge rules, the part these files use. Mappings merge
    key by key; command, entrypoint and healthcheck.test are replaced; a service's volumes merge by container path
    (an override's mount replaces the base's at the same path); other sequences are joined without duplicates."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merged(base[k], v, path + (k,)) if k in base else v for k, v in override.items()}}
    if not (isinstance(base, list) and isinstance(override, list)):
        return override
    if path[-1] in ("command", "entrypoint") or path[-2:] == ("healthcheck", "test"):
        return override
    if path[0] == "services" and path[-1] == "volumes":
        return list({v.split(":")[1]: v for v in base + override}.values())
    return base + [item for item in override if item not in base]


@cache
def _replica_stack() -> dict[str, Any]:
    """`docker compose -f compose.yaml -f compose.replicas.yaml config`, every variable unset."""
    return _merged(_compose(), _compose_file(REPLICAS_FILE))


@cache
def _haproxy() -> dict[str, tuple[tuple[str, ...], ...]]:
    """deploy/haproxy.cfg as HAProxy reads it: section header ("backend replicas") -> its lines, each split into
    words (quotes group words, an unquoted # starts a comment)."""
    sections: dict[str, list[tuple[str, ...]]] = {}
    current: list[tuple[str, ...]] = []
    for line in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        words = tuple(shlex.split(line, comments=True))
        if not words:
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return {name: tuple(lines) for name, lines in sections.items()}


def _haproxy_lines(section: str, *keyword: str) -> list[tuple[str, ...]]:
    """The lines of section that start with the words of keyword, those words dropped."""
    return [words[len(keyword):] for words in _haproxy()[section] if words[:len(keyword)] == keyword]


def _replicas() -> list[str]:
    names = [name for name in _replica_stack()["services"] if _REPLICA.fullmatch(name)]
    assert len(names) >= 2, names
    return names


def _health_path(service: str, stack: dict[str, Any]) -> str:
    [url] = re.findall(r"http://127\.0\.0\.1:\d+(/\w+)", " ".join(_service(service, stack)["healthcheck"]["test"]))
    return url


def test_replica_files_are_valid_against_the_compose_specification() -> None:
    validator = jsonschema.Draft7Validator(json.loads((DEPLOY / "compose-spec.schema.json").read_text()))
    for model in (_compose_file(REPLICAS_FILE), _replica_stack()):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(model)]
        assert not errors, errors
    typo = copy.deepcopy(_compose_file(REPLICAS_FILE))
    typo["services"]["pie-0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_id"] = ["0"]
    assert not validator.is_valid(typo)
    # Every variable is ${NAME} or ${NAME:-default}: what compose interpolates is what _interpolated did.
    assert "$" not in json.dumps(_replica_stack())


def test_replica_overlay_starts_the_replicas_and_the_balancer_instead_of_the_single_server() -> None:
    services = _replica_stack()["services"]
    assert {name for name, spec in services.items() if not spec.get("profiles")} == {*_replicas(), LB_SERVICE}
    assert services[GPU_SERVICE]["profiles"] == ["single"]
    for name in MONITORING:
        assert "monitoring" in services[name]["profiles"]
    assert [p for spec in services.values() if not spec.get("profiles") for p in spec.get("ports", [])
            if _container_port(p) == 8000] == _service(GPU_SERVICE)["ports"]  # only the balancer publishes 8000


def test_each_replica_is_the_gpu_server_on_a_gpu_of_its_own() -> None:
    stack, single = _replica_stack(), _service(GPU_SERVICE)
    for name in _replicas():
        replica = _service(name, stack)
        for key in ("build", "image", "command", "volumes", "healthcheck", "restart"):
            assert replica[key] == single[key], f"{name}.{key} differs from {GPU_SERVICE}'s"
        assert "ports" not in replica
        assert _server_args(name, stack) == _server_args(GPU_SERVICE)
        [device] = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" not in device
        assert device["device_ids"] == [_REPLICA.fullmatch(name)[1]]  # pie-N on GPU N: one GPU each


def test_replicas_start_after_the_first_has_filled_the_shared_cache() -> None:
    first, *others = sorted(_replicas(), key=lambda name: int(_REPLICA.fullmatch(name)[1]))
    assert "depends_on" not in _service(first, _replica_stack())
    for name in others:
        assert _service(name, _replica_stack())["depends_on"] == {first: {"condition": "service_healthy"}}


def test_balancer_publishes_the_server_port_and_reads_the_haproxy_config() -> None:
    lb = _service(LB_SERVICE, _replica_stack())
    assert _bind_mounts(LB_SERVICE, _replica_stack()) == {"/usr/local/etc/haproxy/haproxy.cfg": DEPLOY / "haproxy.cfg"}
    assert sorted(lb["depends_on"]) == sorted(_replicas())
    binds = {int(words[0].rsplit(":", 1)[1]) for section in ("frontend openai", "frontend stats")
             for words in _haproxy_lines(section, "bind")}
    assert {_container_port(p) for p in lb["ports"]} == binds
    assert _haproxy_lines("frontend openai", "default_backend") == [("replicas",)]


def test_haproxy_sends_a_session_to_one_healthy_replica() -> None:
    stack, backend = _replica_stack(), "backend replicas"
    servers = {words[0]: words[1] for words in _haproxy_lines(backend, "server")}
    assert servers == {name: f"{name}:{_server_args(name, stack).port}" for name in _replicas()}
    assert _haproxy_lines(backend, "balance") == [("hdr(x-session-id)",)]
    assert _haproxy_lines(backend, "hash-type")[0][0] == "consistent"  # a replica that leaves moves only its own
    health = {_health_path(name, stack) for name in _replicas()}
    assert _haproxy_lines(backend, "option", "httpchk") == [("GET", *health)] and health <= OPEN_PATHS
    assert _haproxy_lines(backend, "http-check", "expect") == [("status", "200")]  # 503 while loading: no traffic
    [defaults] = _haproxy_lines(backend, "default-server")
    assert "check" in defaults and not any("check" in words[2:] for words in _haproxy_lines(backend, "server"))


def test_haproxy_answers_its_own_errors_in_openai_shape() -> None:
    statuses = set()
    for words in _haproxy_lines("defaults", "http-error", "status"):
        status, options = int(words[0]), dict(zip(words[1::2], words[2::2]))
        assert options["content-type"] == "application/json"
        error = json.loads(options["string"])["error"]
        as_server_would = ApiError(error["message"], status, error["param"], error["code"], error["type"])
        assert as_server_would.body() == {"error": error}
        statuses.add(status)
        if status == 503:  # no replica ready
            assert error["type"] == ApiError("", 503).error_type
    assert statuses == {502, 503, 504}


def test_prometheus_scrapes_every_replica_and_haproxy() -> None:
    stack = _replica_stack()
    config_file = _bind_mounts("prometheus", stack)["/etc/prometheus/prometheus.yml"]
    assert config_file == DEPLOY / "prometheus-replicas.yml"
    jobs = {job["job_name"]: job for job in yaml.safe_load(config_file.read_text())["scrape_configs"]}
    targets = {name: sorted(t for static in job["static_configs"] for t in static["targets"])
               for name, job in jobs.items()}
    assert targets["pie"] == sorted(f"{name}:{_server_args(name, stack).port}" for name in _replicas())
    [stats_bind] = _haproxy_lines("frontend stats", "bind")
    assert targets["haproxy"] == [f"{LB_SERVICE}:{stats_bind[0].rsplit(':', 1)[1]}"]
    assert _haproxy_lines("frontend stats", "http-request", "use-service") == [
        ("prometheus-exporter", "if", "{", "path", jobs["haproxy"]["metrics_path"], "}")]


class _ChatRecorder(http.server.BaseHTTPRequestHandler):
    """Answers every POST with a minimal chat completion and keeps the request headers (server.seen)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(self.headers)  # type: ignore[attr-defined]
        body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


def test_openai_client_sends_the_affinity_key_on_every_turn_as_documented() -> None:
    """The key the balancer hashes reaches it from the plain openai SDK, set once per client (default_headers)
    or per request (extra_headers), as docs/deploy.md shows."""
    [[balance]] = _haproxy_lines("backend replicas", "balance")
    header = re.fullmatch(r"hdr\((.+)\)", balance)[1]
    docs = (REPO_ROOT / "docs/deploy.md").read_text()
    assert f'default_headers={{"{header}":' in docs and f'extra_headers={{"{header}":' in docs
    assert f"-H '{header}: " in docs  # curl
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatRecorder)
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        chat = openai.OpenAI(base_url=url, api_key="k", max_retries=0, default_headers={header: "chat-1"})
        messages = [{"role": "user", "content": "Hi"}]
        for _turn in range(2):
            reply = chat.chat.completions.create(model="m", messages=messages).choices[0].message.content
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]
        plain = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        plain.chat.completions.create(model="m", messages=messages, extra_headers={header: "chat-2"})
        plain.chat.completions.create(model="m", messages=messages)
    finally:
        server.shutdown()
        server.server_close()
    assert [seen.get(header) for seen in server.seen] == ["chat-1", "chat-1", "chat-2", None]

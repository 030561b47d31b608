"""`pie serve`: the OpenAI-compatible HTTP server (uvicorn) over the engine and the default inferlet.

The server answers at once; /health says 503 until the model is loaded and the default inferlet is built
(componentize-py, cached) and compiled (wasmtime, cached).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pie_server.app.config import ServerConfig
from pie_server.engine.gil import server_switch_interval_s, set_server_switch_interval

DEFAULT_PORT = 8000
CONFIG_ENV_VAR = "PIE_SERVER_CONFIG"  # the ServerConfig of front-end processes
RUNTIME_ENV_VAR = "PIE_RUNTIME_LIMITS"  # their inferlet sandbox limits (JSON)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The parser's help texts (app/cli.py).
SUMMARY = "start the OpenAI-compatible HTTP server"
DESCRIPTION = """\
Serves OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models), the inferlet API (/v1/inferlets,
/v1/runs), /health and /metrics. It listens at once; GET /health answers 503 until the model is loaded and
the default inferlet is built and compiled (both cached under $PIE_CACHE_DIR, else ~/.cache/pie), then 200.
Without --model it serves the embedded SmolLM2-135M-Instruct. Reference: docs/api.md."""
EXAMPLES = """\
  pie serve                                          # SmolLM2-135M-Instruct on CPU, http://127.0.0.1:8000
  pie serve --model ~/models/Llama-3.1-8B-Instruct --device cuda --host 0.0.0.0 --api-key KEY
  pie serve --model model.Q8_0.gguf --served-model-name chat --port 9000
  pie serve --http-allow api.example.com --inferlet-time-budget 120   # what inferlets may do"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-model-name", action="append", default=None,
                        help="the name(s) clients use in 'model' (default: the model's name); repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (health, metrics and version stay open; empty: no "
                             "key); repeatable: each key is a tenant of its own, which sees only its own inferlets, "
                             "runs, exported KV pages and key-value store")
    parser.add_argument("--api-keys-file", type=Path, default=None, metavar="PATH",
                        help="more API keys, one a line: 'KEY' or 'KEY NAME' (the tenant's name; keys with the same "
                             "name share a tenant; an unnamed key's tenant is named after a hash of it); '#' comments")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights and KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--page-size", type=int, default=16, help="KV slots per page (a power of two)")
    parser.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from free memory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="CUDA: share of the GPU's memory for weights, activations, graphs and the KV cache")
    parser.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                        help="host memory (GiB, per GPU) for KV pages swapped out under pressure (default: 1 GiB, "
                             "at most the pool's size)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="tokens per engine step")
    parser.add_argument("--max-batch-size", type=int, default=256, help="sequences per engine step")
    parser.add_argument("--max-running-requests", type=int, default=256,
                        help="requests whose inferlet runs at once in each front-end process; later ones queue "
                             "there (the engine core batches at most its own --max-batch-size per step)")
    parser.add_argument("--warm-instances", type=int, default=0, metavar="N",
                        help="instances of the default inferlet each front end starts ahead of requests, in its idle "
                             "time (a request then skips instantiation and first-call costs; about 8 MiB each; "
                             "default: 0, docs/decisions/warm-instances.md has the measurements)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run every step without CUDA graphs")
    parser.add_argument("--no-piecewise-graphs", action="store_true",
                        help="run steps with prefill tokens eagerly (default: all but attention from CUDA graphs, "
                             "for steps of up to --piecewise-max-tokens tokens)")
    parser.add_argument("--piecewise-max-tokens", type=int, default=512, metavar="N",
                        help="the largest step (tokens) whose layers replay from CUDA graphs; larger ones run "
                             "eagerly (each bucket up to it is captured at start-up; default: 512)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N GPUs (cuda:0..N-1, or from --device cuda:K), Megatron-style; N "
                             "must divide the model's attention and KV heads (docs/decisions/tensor-parallel.md)")
    parser.add_argument("--api-processes", type=int, default=None,
                        help="front-end processes (HTTP, SSE, detokenisation, inferlets) beside one engine-core "
                             "process (control layer + executor); 0: everything in one process "
                             "(default: 0 on CPU, 4 on CUDA; docs/decisions/engine-core.md)")
    limits = parser.add_argument_group(
        "inferlet sandbox limits (every instance, the default inferlet's too; a run's \"limits\" may lower the "
        "first three, never raise them)")
    limits.add_argument("--inferlet-time-budget", type=float, default=600.0, metavar="SECONDS",
                        help="wall-clock time an instance may run, waiting included (default: 600)")
    limits.add_argument("--inferlet-time-slice-ms", type=float, default=5.0, metavar="MS",
                        help="how long a guest runs before its front end's scheduler polls the others (the "
                             "epoch tick; default: 5)")
    limits.add_argument("--inferlet-memory-mib", type=int, default=256, metavar="MIB",
                        help="linear memory per instance (default: 256)")
    limits.add_argument("--inferlet-max-pages", type=int, default=None, metavar="PAGES",
                        help="KV pages an instance may hold (default: no quota below the pool's size)")
    limits.add_argument("--tenant-max-instances", type=int, default=None, metavar="N",
                        help="instances a tenant (an API key) may run at once, chat requests included; one more "
                             "is refused with 429 (default: no limit)")
    limits.add_argument("--tenant-max-pages", type=int, default=None, metavar="PAGES",
                        help="KV pages all of a tenant's instances may hold together; an allocation past it fails "
                             "in the inferlet as the per-instance quota does (default: no limit)")
    limits.add_argument("--http-allow", action="append", default=[], metavar="HOST",
                        help="a host inferlets may reach with outgoing HTTP ('*.example.com' for subdomains); "
                             "repeatable (default: none)")
    parser.add_argument("--compile-cache-mib", type=int, default=2048, metavar="MIB",
                        help="disk space for compiled inferlets (about 40 MB each) under $PIE_CACHE_DIR/compiled; "
                             "the least recently used go first (default: 2048)")
    parser.add_argument("--default-inferlet", type=Path, default=None,
                        help="a prebuilt default inferlet (.wasm) instead of building inferlets/builtin/default")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        switch_interval_s = server_switch_interval_s()  # set once everything is valid (an error changes nothing)
        engine_config = _engine_config(args)
        num_front_ends = _num_front_ends(args.api_processes, engine_config.device)
        os.environ[RUNTIME_ENV_VAR] = json.dumps(_runtime_limits(args, max(1, num_front_ends)))
        _runtime_config()  # validates the limits now, not in a front end
        config = ServerConfig(api_keys=_api_keys(args), served_model_names=tuple(args.served_model_name or ()),
                              max_running_requests=args.max_running_requests,
                              inferlet_wasm=args.default_inferlet,
                              warm_instances=args.warm_instances)
    except (ValueError, OSError) as error:
        print(f"pie serve: error: {error}")
        return 2
    if args.default_inferlet is not None and not args.default_inferlet.is_file():
        print(f"pie serve: error: {args.default_inferlet}: no such file")
        return 2
    sys.setswitchinterval(switch_interval_s)  # the one-process server's (front ends and the core set their own)
    print(f"pie serve: listening on http://{args.host}:{args.port} (GET /health is 200 once the model is loaded)",
          flush=True)
    if num_front_ends == 0:
        return _serve_in_one_process(args, engine_config, config)
    return _serve_with_engine_core(args, engine_config, config, num_front_ends)


def _serve_in_one_process(args: argparse.Namespace, engine_config, config: ServerConfig) -> int:  # type: ignore[no-untyped-def]
    import uvicorn

    from pie_server.app.commands.serve_drain import serve
    from pie_server.app.server import create_app

    def engine_factory():  # type: ignore[no-untyped-def]
        from pie_server.engine.engine import Engine

        return Engine.start(args.model, engine_config, runtime_config=_runtime_config())

    serve(uvicorn.Config(create_app(engine_factory, config), host=args.host, port=args.port,
                         log_level=args.log_level, timeout_keep_alive=30))
    return 0


def _serve_with_engine_core(args: argparse.Namespace, engine_config, config: ServerConfig,  # type: ignore[no-untyped-def]
                            num_front_ends: int) -> int:
    """The engine core in a process of its own, restarted if it ends (engine/core/supervisor.py); uvicorn runs the
    front ends: this process for one, else num_front_ends worker processes sharing the listening socket (uvicorn
    spreads connections over them)."""
    import uvicorn

    from pie_server.app.commands.serve_drain import serve, serve_workers
    from pie_server.engine.core.process import ENV_VAR, CoreSpec
    from pie_server.engine.core.supervisor import CoreSupervisor

    run_dir = tempfile.mkdtemp(prefix="pie-serve-")
    if num_front_ends > 1:
        metrics_dir = Path(run_dir) / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before any front end imports the client
        # Every front end takes connections only once it can serve (ServerConfig.accept_before_ready).
        config = dataclasses.replace(config, metrics_dir=metrics_dir, accept_before_ready=False)
    supervisor = CoreSupervisor(CoreSpec(args.model, engine_config, run_dir, log_level=args.log_level.upper()))
    os.environ[ENV_VAR] = supervisor.address.to_env()
    os.environ[CONFIG_ENV_VAR] = config.to_json()
    try:
        if num_front_ends > 1:
            serve_workers(uvicorn.Config(f"{__name__}:front_app", factory=True, workers=num_front_ends,
                                         host=args.host, port=args.port, log_level=args.log_level,
                                         timeout_keep_alive=30))
        else:
            serve(uvicorn.Config(front_app(), host=args.host, port=args.port, log_level=args.log_level,
                                 timeout_keep_alive=30))
    finally:
        supervisor.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def front_app():  # type: ignore[no-untyped-def]
    """A front end's Starlette app, configured through the environment (uvicorn calls it in each worker)."""
    from pie_server.app.server import create_app
    from pie_server.engine.core.process import CoreAddress

    core, config = CoreAddress.from_env(), ServerConfig.from_json(os.environ[CONFIG_ENV_VAR])
    set_server_switch_interval()
    if not logging.getLogger().handlers:  # a worker process uvicorn spawned: it configured only its own loggers,
        # at --log-level; the server's (pie.*) get the same level and main's format
        logging.basicConfig(level=logging.getLogger("uvicorn.error").level, format=LOG_FORMAT)

    def engine_factory():  # type: ignore[no-untyped-def]
        from pie_server.engine.front import FrontEngine

        return FrontEngine.connect(core, _runtime_config())

    return create_app(engine_factory, config)


def _num_front_ends(api_processes: int | None, device: str) -> int:
    if api_processes is None:  # measured: docs/decisions/engine-core.md
        return 0 if device == "cpu" else 4
    if api_processes < 0:
        raise ValueError("--api-processes must be >= 0")
    return api_processes


def _api_keys(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """(key, tenant) of every --api-key (an empty one means none) and of the keys file."""
    from pie_server.app.auth import key_tenant, read_keys_file

    given = tuple((key, key_tenant(key)) for key in args.api_key if key)
    return given + (read_keys_file(args.api_keys_file) if args.api_keys_file is not None else ())


def _runtime_limits(args: argparse.Namespace, num_front_ends: int) -> dict[str, object]:
    """The sandbox settings of the command line. The per-tenant quotas are counted in each front end's runtime:
    each gets its share (a tenant's requests spread over the front ends)."""
    if args.compile_cache_mib <= 0:
        raise ValueError("--compile-cache-mib must be positive")
    if not 0 < args.inferlet_time_slice_ms <= 1000:
        raise ValueError("--inferlet-time-slice-ms must be in (0, 1000]")
    return {"time_budget_s": args.inferlet_time_budget, "epoch_tick_s": args.inferlet_time_slice_ms / 1000,
            "memory_limit_bytes": args.inferlet_memory_mib << 20,
            "max_pages_per_instance": args.inferlet_max_pages, "http_allowed_hosts": list(args.http_allow),
            "max_instances_per_tenant": _share(args.tenant_max_instances, num_front_ends),
            "max_pages_per_tenant": _share(args.tenant_max_pages, num_front_ends),
            "compile_cache_bytes": args.compile_cache_mib << 20}


def _share(limit: int | None, num_parts: int) -> int | None:
    if limit is not None and limit <= 0:
        raise ValueError("the tenant quotas must be positive")
    return None if limit is None else -(-limit // num_parts)


def _runtime_config():  # -> RuntimeConfig
    """The runtime's settings: the sandbox limits of the command line (through the environment, so every
    front-end process gets them) and the compiled-component cache."""
    from pie_server.engine.runtime.config import RuntimeConfig

    limits = json.loads(os.environ.get(RUNTIME_ENV_VAR, "{}"))
    if "http_allowed_hosts" in limits:
        limits["http_allowed_hosts"] = tuple(limits["http_allowed_hosts"])
    return RuntimeConfig(cache_dir=str(_cache_root() / "compiled"), **limits)


def _engine_config(args: argparse.Namespace):  # -> EngineConfig
    from pie_server.engine.config import EngineConfig

    return EngineConfig(device=args.device, dtype=args.dtype, page_size=args.page_size, num_pages=args.num_pages,
                        max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                        cuda_graphs=not args.no_cuda_graphs, piecewise_graphs=not args.no_piecewise_graphs,
                        piecewise_max_tokens=args.piecewise_max_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        tensor_parallel_size=args.tensor_parallel_size, swap_space_gib=args.swap_space)


def _cache_root() -> Path:
    from pie_server.app.inferlet_build import default_cache_dir

    return default_cache_dir().parent  # $PIE_CACHE_DIR, else ~/.cache/pie

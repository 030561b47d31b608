"""HTTP load generator: streaming chat completions at several concurrencies; reports TTFT, TPOT, ITL and
output throughput. The load generation is the package's (app/bench_load.py, what `pie bench` runs); this script
adds a local `pie serve` to measure and keeps the flags and the JSON scripts/gpu_serving.sh and
bench/serving_table.py rely on.

    .venv/bin/python bench/http_load.py                        # starts `pie serve` (default model) in a subprocess
    .venv/bin/python bench/http_load.py --url http://host:8000 --model NAME
    options: --concurrency 1 8 32  --requests-per-level 32  --max-tokens 64  --json bench/results/http_load.json
             --serve-args '--api-processes 2'     # more options for the local `pie serve`
             --json-schema                        # structured output: every answer under STRUCTURED_SCHEMA

Each request streams (stream_options.include_usage) a fixed number of tokens (ignore_eos). Per request:
TTFT = first content chunk - send; TPOT = (last chunk - first chunk) / (output tokens - 1); ITL = gaps
between content chunks. Throughput = all output tokens of a level / its wall time. Medians and p90s over the
requests that completed; a level's failed requests are counted (num_errors in the JSON; exit status 1).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pie_server.app.bench_load import LevelReport, LoadConfig, results_json, run_level, warm_up

# --json-schema: an array of at least 64 short strings, so an answer of --max-tokens tokens never ends early
# (what a model writes under it only picks the strings' letters).
STRUCTURED_SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {
    "items": {"type": "array", "minItems": 64, "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}}}}


class LocalServer:
    """`pie serve` (the installed console script) in a subprocess on a free loopback port, as users run it;
    the load generator's own work then never shares the server's GIL."""

    def __init__(self, model: str | None, num_pages: int | None, extra_args: list[str] | None = None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [*_pie_command(), "serve", "--port", str(port),
                   "--served-model-name", "default", "--log-level", "warning"]
        command += ["--model", model] if model else []
        command += ["--num-pages", str(num_pages)] if num_pages else []
        command += extra_args or []
        self.process = subprocess.Popen(command, cwd=tempfile.gettempdir())
        started = time.monotonic()
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > started + 900:
                self.close()
                raise RuntimeError("the server did not become ready")
            time.sleep(0.5)
        self.ready_s = time.monotonic() - started  # start-up: model, KV pool, graphs, front ends (+- 0.5 s)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def _pie_command() -> list[str]:
    """The console script beside this interpreter; where the package is importable but not installed (the GPU
    machine: PYTHONPATH links, scripts/gpu_serving.sh) there is none, and the module runs the same CLI."""
    script = Path(sys.executable).with_name("pie")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pie_server.app.cli"]


async def main_async(args: argparse.Namespace, url: str) -> list[LevelReport]:
    config = LoadConfig(url=url, model=args.model, concurrency=tuple(args.concurrency),
                        num_requests=args.requests_per_level, max_tokens=args.max_tokens, api_key=args.api_key,
                        json_schema=STRUCTURED_SCHEMA if args.json_schema else None)
    failed_warm_up = await warm_up(config)
    if failed_warm_up:
        print(f"warm-up failed: {failed_warm_up}", file=sys.stderr, flush=True)
    reports = []
    for concurrency in config.concurrency:
        reports.append(await run_level(config, concurrency))
        print(_line(reports[-1]), flush=True)
    return reports


def _line(report: LevelReport) -> str:
    line = (f"c={report.concurrency:>3}  {report.output_tokens_per_s:8.1f} tok/s  "
            f"TTFT {_ms(report.ttft_median_ms, 7)} ms (p90 {_ms(report.ttft_p90_ms, 7)})  "
            f"TPOT {_ms(report.tpot_median_ms, 6)} ms (p90 {_ms(report.tpot_p90_ms, 6)})  "
            f"ITL {_ms(report.itl_median_ms, 6)} ms (p90 {_ms(report.itl_p90_ms, 6)}, p99 {_ms(report.itl_p99_ms, 6)}, "
            f"longest per request {_ms(report.max_gap_median_ms, 6)})")
    if report.num_errors:
        line += f"  {report.num_errors} of {report.num_requests} failed, the first: {report.first_error}"
    return line


def _ms(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start `pie serve` in a subprocess)")
    parser.add_argument("--model", default="default", help="the model name to request")
    parser.add_argument("--model-path", default=None, help="for the local server (default: embedded model)")
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--serve-args", default="", help="more `pie serve` options, e.g. '--api-processes 2'")
    parser.add_argument("--json-schema", action="store_true",
                        help="structured output: each request's response_format is STRUCTURED_SCHEMA")
    args = parser.parse_args()
    server = None if args.url else LocalServer(args.model_path, args.num_pages, args.serve_args.split())
    try:
        reports = asyncio.run(main_async(args, args.url or server.url))
    finally:
        if server is not None:
            server.close()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results_json(args.max_tokens, reports), indent=2))
    return 1 if any(r.num_errors for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

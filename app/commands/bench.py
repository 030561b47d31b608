"""`pie bench`: load a running OpenAI-compatible server (ours or vLLM) with streamed chat completions at several
concurrencies and print a table; the load generator itself is app/bench_load.py.

The table goes to stdout, a row per level as it finishes; what went wrong and the progress bar go to stderr.
Exit status: 0 when every request completed, 1 when some failed (the JSON is still written) or the server's
models could not be listed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from pie_server.app.bench_load import LevelReport, LoadConfig, results_json, run_level, warm_up
from pie_server.app.commands.client import ServerError, add_server_arguments, call
from pie_server.app.stream_client import server_root
from pie_server.engine.progress import progress_bar

SUMMARY = "load a running OpenAI-compatible server; report tokens/s, TTFT, TPOT"
DESCRIPTION = """\
Sends streamed chat completions to a running OpenAI-compatible server (`pie serve`, vLLM, ...) with a fixed
number of requests in flight, for each --concurrency level in turn, and prints one row per level: output
tokens per second, time to first token (TTFT) and time per output token after the first (TPOT), median and
p90, and the failed requests. Every request generates exactly --max-tokens tokens (ignore_eos); one short
warm-up request goes first. Exit status 1 if any request failed."""
EXAMPLES = """\
  pie bench                                          # the server on 127.0.0.1:8000 (or $PIE_URL), its first model
  pie bench --concurrency 1 8 32 --num-requests 64 --max-tokens 256
  pie bench --url http://gpu-box:8000 --model llama-3.1-8b --api-key KEY --json results/c1-64.json"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COLUMNS = (("concurrency", 11), ("requests", 8), ("errors", 6), ("output tok/s", 12), ("TTFT median ms", 14),
           ("TTFT p90 ms", 11), ("TPOT median ms", 14), ("TPOT p90 ms", 11))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--model", default=None,
                        help="the model to request (default: the server's first, from GET /v1/models)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="N",
                        help="requests in flight; one level per value, in order (default: 1 8 32)")
    parser.add_argument("--num-requests", type=int, default=32, metavar="N",
                        help="requests per level, raised to the level's concurrency if lower (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=128, metavar="N",
                        help="output tokens per request, all generated (default: 128)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="a request that takes longer counts as failed (default: 600)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the results as JSON (the format of bench/http_load.py)")


def main(args: argparse.Namespace) -> int:
    args.url = server_root(args.url)
    try:
        model = args.model or first_model(args)
    except ServerError as error:
        print(f"pie bench: error: cannot list the server's models ({error}); --model skips that", file=sys.stderr)
        return EXIT_FAILED
    try:
        config = LoadConfig(url=args.url, model=model, concurrency=tuple(args.concurrency),
                            num_requests=args.num_requests, max_tokens=args.max_tokens, api_key=args.api_key,
                            timeout_s=args.timeout)
    except ValueError as error:
        print(f"pie bench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"pie bench: {config.url}, model {model}, {config.max_tokens} output tokens per request",
          file=sys.stderr, flush=True)
    reports = asyncio.run(_run(config))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results_json(config.max_tokens, reports), indent=2) + "\n")
        print(f"pie bench: wrote {args.json}", file=sys.stderr)
    return EXIT_FAILED if any(r.num_errors for r in reports) else EXIT_OK


def first_model(args: argparse.Namespace) -> str:
    models = call(args, "GET", "/v1/models", timeout_s=30.0).get("data") or []
    if not models:
        raise ServerError("it lists none")
    return str(models[0]["id"])


async def _run(config: LoadConfig) -> list[LevelReport]:
    failed_warm_up = await warm_up(config)
    if failed_warm_up:
        print(f"pie bench: the warm-up request failed: {failed_warm_up}", file=sys.stderr, flush=True)
    print(header(), flush=True)
    reports = []
    for concurrency in config.concurrency:
        with progress_bar(f"concurrency {concurrency}", total=config.requests_at(concurrency), unit="req",
                          leave=False) as bar:
            report = await run_level(config, concurrency, lambda: bar.update(1))
        print(row(report), flush=True)
        if report.num_errors:
            print(f"pie bench: concurrency {concurrency}: {report.num_errors} of {report.num_requests} requests "
                  f"failed, the first with: {report.first_error}", file=sys.stderr, flush=True)
        reports.append(report)
    return reports


def header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width in COLUMNS)


def row(report: LevelReport) -> str:
    values = (str(report.concurrency), str(report.num_requests), str(report.num_errors),
              f"{report.output_tokens_per_s:.1f}", _number(report.ttft_median_ms), _number(report.ttft_p90_ms),
              _number(report.tpot_median_ms, 2), _number(report.tpot_p90_ms, 2))
    return "  ".join(f"{value:>{width}}" for value, (_, width) in zip(values, COLUMNS))


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

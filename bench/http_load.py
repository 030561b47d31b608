"""HTTP load generator: streaming chat completions through the OpenAI client at several concurrencies;
reports TTFT, TPOT, ITL and output throughput.

    .venv/bin/python bench/http_load.py                        # starts `pie serve` (default model) in a subprocess
    .venv/bin/python bench/http_load.py --url http://host:8000 --model NAME
    options: --concurrency 1 8 32  --requests-per-level 32  --max-tokens 64  --json bench/results/http_load.json
             --serve-args '--api-processes 2'     # more options for the local `pie serve`

Each request streams (stream_options.include_usage) a fixed number of tokens (ignore_eos). Per request:
TTFT = first content chunk - send; TPOT = (last chunk - first chunk) / (output tokens - 1); ITL = gaps
between content chunks. Throughput = all output tokens of a level / its wall time. Medians and p90s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import openai


PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a bicycle stays upright.", "List some facts about the moon.",
           "Describe a walk through a forest in autumn."]


@dataclass
class Sample:
    ttft_s: float
    tpot_s: float
    itls_s: list[float]
    num_output_tokens: int
    e2e_s: float


@dataclass
class LevelReport:
    concurrency: int
    num_requests: int
    wall_s: float
    output_tokens_per_s: float
    ttft_median_ms: float
    ttft_p90_ms: float
    tpot_median_ms: float
    tpot_p90_ms: float
    itl_median_ms: float
    itl_p90_ms: float
    e2e_median_s: float


async def one_request(client: openai.AsyncOpenAI, model: str, index: int, max_tokens: int) -> Sample:
    started = time.perf_counter()
    stamps: list[float] = []
    num_tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"{PROMPTS[index % len(PROMPTS)]} (#{index})"}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError("no content was streamed")
    tpot = (stamps[-1] - stamps[0]) / max(1, num_tokens - 1)
    return Sample(ttft_s=stamps[0] - started, tpot_s=tpot, itls_s=[b - a for a, b in zip(stamps, stamps[1:])],
                  num_output_tokens=num_tokens, e2e_s=end - started)


async def run_level(client: openai.AsyncOpenAI, model: str, concurrency: int, num_requests: int,
                    max_tokens: int) -> LevelReport:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            samples.append(await one_request(client, model, queue.get_nowait(), max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    itls = [x for s in samples for x in s.itls_s] or [0.0]
    return LevelReport(
        concurrency=concurrency, num_requests=num_requests, wall_s=wall,
        output_tokens_per_s=sum(s.num_output_tokens for s in samples) / wall,
        ttft_median_ms=1000 * statistics.median(s.ttft_s for s in samples),
        ttft_p90_ms=1000 * _p90([s.ttft_s for s in samples]),
        tpot_median_ms=1000 * statistics.median(s.tpot_s for s in samples),
        tpot_p90_ms=1000 * _p90([s.tpot_s for s in samples]),
        itl_median_ms=1000 * statistics.median(itls), itl_p90_ms=1000 * _p90(itls),
        e2e_median_s=statistics.median(s.e2e_s for s in samples))


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


class LocalServer:
    """`pie serve` (the installed console script) in a subprocess on a free loopback port, as users run it;
    the load generator's own work then never shares the server's GIL."""

    def __init__(self, model: str | None, num_pages: int | None, extra_args: list[str] | None = None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [str(Path(sys.executable).with_name("pie")), "serve", "--port", str(port),
                   "--served-model-name", "default", "--log-level", "warning"]
        command += ["--model", model] if model else []
        command += ["--num-pages", str(num_pages)] if num_pages else []
        command += extra_args or []
        self.process = subprocess.Popen(command, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 900
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the server did not become ready")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def main_async(args: argparse.Namespace, url: str) -> list[LevelReport]:
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
    await one_request(client, args.model, 0, 4)  # warm-up
    reports = []
    for concurrency in args.concurrency:
        report = await run_level(client, args.model, concurrency, max(concurrency, args.requests_per_level),
                                 args.max_tokens)
        reports.append(report)
        print(f"c={concurrency:>3}  {report.output_tokens_per_s:8.1f} tok/s  TTFT {report.ttft_median_ms:7.1f} ms "
              f"(p90 {report.ttft_p90_ms:7.1f})  TPOT {report.tpot_median_ms:6.1f} ms (p90 {report.tpot_p90_ms:6.1f})"
              f"  ITL {report.itl_median_ms:6.1f} ms (p90 {report.itl_p90_ms:6.1f})", flush=True)
    await client.close()
    return reports


def main() -> None:
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
    args = parser.parse_args()
    server = None if args.url else LocalServer(args.model_path, args.num_pages, args.serve_args.split())
    try:
        reports = asyncio.run(main_async(args, args.url or server.url))
    finally:
        if server is not None:
            server.close()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"max_tokens": args.max_tokens, "levels": [asdict(r) for r in reports]},
                                              indent=2))


if __name__ == "__main__":
    main()

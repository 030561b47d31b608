"""Load generation against a running OpenAI-compatible server (ours, vLLM, ...), like `vllm bench serve`:
streamed chat completions at several concurrencies. Used by `pie bench` and bench/http_load.py.

Each request streams (stream_options.include_usage) max_tokens tokens: ignore_eos (a vLLM extension we
implement too) keeps the model from stopping early. A level keeps `concurrency` requests in flight until it has
sent its requests. Per request: TTFT = first content chunk - send; TPOT = (last chunk - first chunk) / (output
tokens - 1); ITL = gaps between content chunks. A level's throughput = its output tokens / its wall time.
Medians and p90s are over the requests that completed; failed ones are counted (num_errors) and left out.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from pie_server.app.stream_client import Endpoint, RequestError, post_events

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a bicycle stays upright.", "List some facts about the moon.",
           "Describe a walk through a forest in autumn."]
WARMUP_MAX_TOKENS = 4
# What one failed request may raise: refused (RequestError), network (OSError), too slow (TimeoutError),
# a malformed response (ValueError: bad JSON or framing; EOFError: cut short).
REQUEST_FAILURES = (RequestError, OSError, TimeoutError, ValueError, EOFError, asyncio.LimitOverrunError)


@dataclass(frozen=True)
class LoadConfig:
    url: str  # the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str
    concurrency: tuple[int, ...]  # one level each, in this order
    num_requests: int  # per level; a level sends at least its concurrency
    max_tokens: int  # per request, all generated (ignore_eos)
    api_key: str | None = None
    timeout_s: float = 600.0  # per request
    json_schema: dict[str, Any] | None = None  # every request's output follows it (response_format json_schema)
    endpoint: Endpoint = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoint", Endpoint.parse(self.url))
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be at least 1")
        if self.num_requests < 1 or self.max_tokens < 1 or self.timeout_s <= 0:
            raise ValueError("num_requests, max_tokens and timeout_s must be positive")
        if not self.model:
            raise ValueError("model must not be empty")

    def requests_at(self, concurrency: int) -> int:
        return max(concurrency, self.num_requests)


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tpot_s: float
    itls_s: list[float]
    num_output_tokens: int
    e2e_s: float


@dataclass(frozen=True)
class LevelReport:
    """One concurrency level. The latency fields are None when no request of the level completed."""
    concurrency: int
    num_requests: int  # sent
    wall_s: float
    output_tokens_per_s: float
    ttft_median_ms: float | None
    ttft_p90_ms: float | None
    tpot_median_ms: float | None
    tpot_p90_ms: float | None
    itl_median_ms: float | None
    itl_p90_ms: float | None
    e2e_median_s: float | None
    num_errors: int = 0
    num_output_tokens: int = 0  # of the completed requests
    first_error: str | None = None
    # Gaps too rare for the ITL's p90 but long enough to move the TPOT: the p99 of all gaps, and the median over
    # requests of each one's longest gap.
    itl_p99_ms: float | None = None
    max_gap_median_ms: float | None = None

    @property
    def num_completed(self) -> int:
        return self.num_requests - self.num_errors


async def one_request(config: LoadConfig, index: int, max_tokens: int) -> Sample:
    """Stream one chat completion; raises one of REQUEST_FAILURES if it does not complete."""
    body = {"model": config.model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"{PROMPTS[index % len(PROMPTS)]} (#{index})"}],
            "stream": True, "stream_options": {"include_usage": True}}
    if config.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "load", "schema": config.json_schema}}
    started = time.perf_counter()
    stamps: list[float] = []
    num_tokens = None
    async with asyncio.timeout(config.timeout_s):
        async for event in post_events(config.endpoint, "/v1/chat/completions", body, config.api_key):
            if "error" in event:
                error = event["error"]
                raise RequestError(f"error in the stream: {error.get('message') if isinstance(error, dict) else error}")
            choices = event.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                num_tokens = int(event["usage"]["completion_tokens"])
    end = time.perf_counter()
    if not stamps:
        raise RequestError("no content was streamed")
    num_tokens = len(stamps) if num_tokens is None else num_tokens  # a server without include_usage: chunks
    return Sample(ttft_s=stamps[0] - started, tpot_s=(stamps[-1] - stamps[0]) / max(1, num_tokens - 1),
                  itls_s=[b - a for a, b in zip(stamps, stamps[1:])], num_output_tokens=num_tokens,
                  e2e_s=end - started)


async def warm_up(config: LoadConfig) -> str | None:
    """One short request before the levels; the error message if it failed."""
    try:
        await one_request(config, 0, WARMUP_MAX_TOKENS)
    except REQUEST_FAILURES as error:
        return describe(error)
    return None


async def run_level(config: LoadConfig, concurrency: int,
                    on_request_done: Callable[[], None] | None = None) -> LevelReport:
    """config.requests_at(concurrency) requests, `concurrency` in flight at a time."""
    num_requests = config.requests_at(concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(num_requests):
        queue.put_nowait(index)
    samples: list[Sample] = []
    errors: list[str] = []

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            try:
                samples.append(await one_request(config, index, config.max_tokens))
            except REQUEST_FAILURES as error:
                errors.append(describe(error))
            if on_request_done is not None:
                on_request_done()

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return level_report(concurrency, num_requests, time.perf_counter() - started, samples, errors)


def level_report(concurrency: int, num_requests: int, wall_s: float, samples: list[Sample],
                 errors: list[str]) -> LevelReport:
    num_tokens = sum(s.num_output_tokens for s in samples)
    ttfts, tpots = [s.ttft_s for s in samples], [s.tpot_s for s in samples]
    itls = [x for s in samples for x in s.itls_s] or ([0.0] if samples else [])
    return LevelReport(
        concurrency=concurrency, num_requests=num_requests, wall_s=wall_s,
        output_tokens_per_s=num_tokens / wall_s if wall_s > 0 else 0.0,
        ttft_median_ms=_ms(_median(ttfts)), ttft_p90_ms=_ms(_p90(ttfts)),
        tpot_median_ms=_ms(_median(tpots)), tpot_p90_ms=_ms(_p90(tpots)),
        itl_median_ms=_ms(_median(itls)), itl_p90_ms=_ms(_p90(itls)),
        e2e_median_s=_median([s.e2e_s for s in samples]),
        num_errors=len(errors), num_output_tokens=num_tokens, first_error=errors[0] if errors else None,
        itl_p99_ms=_ms(_rank(itls, 0.99)), max_gap_median_ms=_ms(_median([max(s.itls_s, default=0.0) for s in samples])))


def results_json(max_tokens: int, reports: list[LevelReport]) -> dict[str, Any]:
    """What bench/http_load.py has always written (bench/serving_table.py reads it), plus the error counts."""
    return {"max_tokens": max_tokens, "levels": [asdict(r) for r in reports]}


def describe(error: BaseException) -> str:
    if isinstance(error, RequestError):
        return str(error)
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _p90(values: list[float]) -> float | None:
    """The value at rank int(0.9 n) of the sorted values (bench/http_load.py's choice, kept for comparisons)."""
    return _rank(values, 0.9)


def _rank(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds

"""Prometheus metrics in text format, with vLLM's metric names under the `pie:` prefix.

Counters and histograms are updated by request handlers (on the event loop); gauges are read from the
engine at scrape time. No client library: the text format is small (version 0.0.4).
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Sequence

PREFIX = "pie:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(_fmt, self.buckets), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        out.append(f"{name}_sum{{{labels}}} {_fmt(self.total)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass(frozen=True)
class EngineGauges:
    """Read from the engine when scraped."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction in [0, 1]
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_success: dict[str, int] = {}  # by finish reason
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def observe_request(self, num_prompt_tokens: int, num_generation_tokens: int,
                        finish_reasons: Sequence[str], e2e_s: float) -> None:
        with self._lock:
            self.prompt_tokens += num_prompt_tokens
            self.generation_tokens += num_generation_tokens
            for reason in finish_reasons:
                self.requests_success[reason] = self.requests_success.get(reason, 0) + 1
            self.e2e.observe(e2e_s)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def render(self, gauges: EngineGauges) -> str:
        labels = f'model_name="{_escape(self.model_name)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {PREFIX}{name} {doc}", f"# TYPE {PREFIX}{name} {kind}", *samples])

        def one(name: str, kind: str, doc: str, value: float) -> None:
            metric(name, kind, doc, [f"{PREFIX}{name}{{{labels}}} {_fmt(value)}"])

        with self._lock:
            one("num_requests_running", "gauge", "Requests whose inferlet instance is running.",
                gauges.num_requests_running)
            one("num_requests_waiting", "gauge", "Requests waiting for an instance slot or KV pages.",
                gauges.num_requests_waiting)
            one("kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.", gauges.kv_cache_usage)
            one("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                gauges.prefix_cache_queries)
            one("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                gauges.prefix_cache_hits)
            one("prompt_tokens_total", "counter", "Prefilled prompt tokens.", self.prompt_tokens)
            one("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
            metric("request_success_total", "counter", "Finished requests by finish reason.",
                   [f'{PREFIX}request_success_total{{{labels},finished_reason="{reason}"}} {count}'
                    for reason, count in sorted(self.requests_success.items())])
            metric("time_to_first_token_seconds", "histogram", "Time to the first token.",
                   self.ttft.lines(f"{PREFIX}time_to_first_token_seconds", labels))
            metric("inter_token_latency_seconds", "histogram", "Time between streamed outputs.",
                   self.itl.lines(f"{PREFIX}inter_token_latency_seconds", labels))
            metric("e2e_request_latency_seconds", "histogram", "Request latency, arrival to last token.",
                   self.e2e.lines(f"{PREFIX}e2e_request_latency_seconds", labels))
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

"""Prometheus metrics with vLLM's metric names under the `pie:` prefix, through prometheus_client.

Counters and histograms are updated by request handlers; gauges (and the prefix cache's counters, which the
engine keeps) are read from the engine at scrape time by a collector. Each Metrics has a registry of its own
(no process-wide state). With `multiprocess_dir` set (prometheus_client's multiprocess mode: every process
writes its samples to files there, PROMETHEUS_MULTIPROC_DIR must name the same folder before prometheus_client
is imported), a scrape of any process aggregates all of them: the shape front-end processes need.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

PREFIX = "pie:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(frozen=True)
class EngineGauges:
    """Read from the engine when scraped."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction in [0, 1]
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0  # instances whose KV the last resort evicted (to be computed again)


class _EngineCollector(Collector):
    """The engine's own numbers, read at scrape time (they live in the engine, not in this process's counters)."""

    def __init__(self, metrics: "Metrics", read: Callable[[], EngineGauges]) -> None:
        self._metrics, self._read = metrics, read

    def collect(self) -> Iterator[Metric]:
        gauges, labels = self._read(), [self._metrics.model_name]

        def family(kind: type, name: str, doc: str, value: float) -> Metric:
            metric = kind(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric(labels, value)
            return metric

        yield family(GaugeMetricFamily, "num_requests_running", "Requests whose inferlet instance is running.",
                     gauges.num_requests_running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Requests waiting for an instance slot or KV pages.",
                     gauges.num_requests_waiting)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.",
                     gauges.kv_cache_usage)
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     gauges.prefix_cache_queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     gauges.prefix_cache_hits)
        yield family(CounterMetricFamily, "num_preemptions", "Instances whose KV cache was evicted, to be computed "
                     "again (out of pages and swap space).", gauges.num_preemptions)


class Metrics:
    def __init__(self, model_name: str, multiprocess_dir: Path | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()  # what a scrape of this process renders
        # Single process: the request metrics live in the registry. Multiprocess: they are written to files
        # (registered nowhere) and the registry reads every process's files back, aggregated.
        own: CollectorRegistry | None = self.registry
        if multiprocess_dir is not None:
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
            own = None
        kwargs = {"labelnames": ["model_name"], "registry": own}
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens.", **kwargs)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", **kwargs)
        self.requests_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                        labelnames=["model_name", "finished_reason"], registry=own)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first token.",
                              buckets=TTFT_BUCKETS, **kwargs)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between streamed outputs.",
                             buckets=ITL_BUCKETS, **kwargs)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=E2E_BUCKETS, **kwargs)
        self._engine: _EngineCollector | None = None

    def read_engine_with(self, read: Callable[[], EngineGauges]) -> None:
        """Registers the scrape-time reader of the engine's gauges (once)."""
        if self._engine is None:
            self._engine = _EngineCollector(self, read)
            self.registry.register(self._engine)

    def observe_request(self, num_prompt_tokens: int, num_generation_tokens: int,
                        finish_reasons: Sequence[str], e2e_s: float) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(num_generation_tokens)
        for reason in finish_reasons:
            self.requests_success.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(e2e_s)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""app.metrics: vLLM's metric names through prometheus_client, the engine's gauges read at scrape time, and the
multiprocess mode in which a scrape of one process aggregates the samples of all (front-end processes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pie_server.app.metrics import EngineGauges, Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_request_metrics_and_engine_gauges() -> None:
    metrics = Metrics("m")
    reads = []
    metrics.read_engine_with(lambda: reads.append(1) or EngineGauges(2, 3, 0.25, 40, 16))
    metrics.observe_ttft(0.03)
    metrics.observe_itl(0.02)
    metrics.observe_request(10, 5, ["stop", "length"], 1.2)
    samples = _samples(metrics.render().decode())
    model = (("model_name", "m"),)
    assert samples[("pie:prompt_tokens_total", model)] == 10
    assert samples[("pie:generation_tokens_total", model)] == 5
    assert samples[("pie:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 1
    assert samples[("pie:time_to_first_token_seconds_count", model)] == 1
    assert samples[("pie:time_to_first_token_seconds_bucket", (("le", "0.04"), ("model_name", "m")))] == 1
    assert samples[("pie:time_to_first_token_seconds_bucket", (("le", "0.02"), ("model_name", "m")))] == 0
    assert samples[("pie:num_requests_running", model)] == 2
    assert samples[("pie:num_requests_waiting", model)] == 3
    assert samples[("pie:kv_cache_usage_perc", model)] == 0.25
    assert samples[("pie:prefix_cache_hits_total", model)] == 16
    assert reads == [1]  # read once per scrape


def test_model_name_set_after_construction_labels_later_samples() -> None:
    metrics = Metrics("")
    metrics.model_name = "served"
    metrics.observe_request(1, 1, ["stop"], 0.1)
    assert _samples(metrics.render().decode())[("pie:prompt_tokens_total", (("model_name", "served"),))] == 1


_OBSERVER = """
import sys
from pathlib import Path
from pie_server.app.metrics import Metrics
Metrics("m", multiprocess_dir=Path(sys.argv[1])).observe_request(int(sys.argv[2]), 1, ["stop"], 0.5)
"""


def test_multiprocess_mode_aggregates_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for num_prompt_tokens in (7, 11):
        subprocess.run([sys.executable, "-c", _OBSERVER, str(tmp_path), str(num_prompt_tokens)], env=env,
                       check=True, cwd=tmp_path)
    scrape = ("import sys\nfrom pathlib import Path\nfrom pie_server.app.metrics import Metrics\n"
              "sys.stdout.write(Metrics('m', multiprocess_dir=Path(sys.argv[1])).render().decode())")
    text = subprocess.run([sys.executable, "-c", scrape, str(tmp_path)], env=env, check=True, cwd=tmp_path,
                          capture_output=True, text=True).stdout
    samples = _samples(text)
    assert samples[("pie:prompt_tokens_total", (("model_name", "m"),))] == 18
    assert samples[("pie:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 2
    assert samples[("pie:e2e_request_latency_seconds_count", (("model_name", "m"),))] == 2

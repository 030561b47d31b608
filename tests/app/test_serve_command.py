"""`pie serve` as a user starts it: a subprocess on a loopback port, polled until /health is 200."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.app import raw_http


BARE_REQUEST = json.dumps({
    "version": 1, "prompts": [{"token_ids": [1, 2, 3]}], "n": 1, "max_tokens": 4,
    "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None, "presence_penalty": 0.0,
                 "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": [], "num_logprobs": None},
    "stop": [], "stop_token_ids": [], "ignore_eos": True, "constraint": None})


def _kill_engine_core(log_path: Path) -> None:
    match = re.search(r"engine core \(process (\d+)\) ready", log_path.read_text())
    assert match, log_path.read_text()
    os.kill(int(match.group(1)), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("api_processes", [0, 2])
def test_pie_serve_subprocess(tiny_llama_dir: Path, default_inferlet_wasm: Path, tmp_path: Path,
                              api_processes: int) -> None:
    """0: one process for everything; 2: two front-end processes beside the engine-core process."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    pie = Path(sys.executable).with_name("pie")  # the installed console script, as a user runs it
    command = [str(pie), "serve", "--model", str(tiny_llama_dir), "--port", str(port),
               "--num-pages", "64", "--api-key", "k1", "--served-model-name", "tiny",
               "--default-inferlet", str(default_inferlet_wasm), "--log-level", "info",
               "--api-processes", str(api_processes), "--inferlet-time-budget", "20"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ))
    try:
        deadline, num_healthy = time.monotonic() + 600, 0
        # Every front end loads on its own (they answer 503 until then) and each new connection may reach any
        # of them: healthy is 200 on several fresh connections in a row.
        while num_healthy < 4 * max(1, api_processes):
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                num_healthy = num_healthy + 1 if raw_http.request(url + "/health", timeout=5)[0] == 200 else 0
            except OSError:
                num_healthy = 0
            assert time.monotonic() < deadline, "pie serve did not become healthy"
            time.sleep(0.05 if num_healthy else 0.2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        outs = [client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
                for _ in range(4)]
        assert all(o.usage.completion_tokens == 3 and o.choices[0].finish_reason == "length" for o in outs)
        assert len({o.choices[0].text for o in outs}) == 1
        # The sandbox limit from the command line reaches every front end: the default inferlet run bare waits
        # for a "go" that never comes, until its time budget ends it.
        run = raw_http.request(url + "/v1/inferlets/default/runs", "POST", {"args": [BARE_REQUEST]},
                               headers={"authorization": "Bearer k1"}, timeout=60)[1]
        assert run["status"] == "failed" and "budget" in run["error"], run
        metrics = raw_http.request(url + "/metrics", timeout=5)[1]
        assert 'pie:generation_tokens_total{model_name="tiny"} 12.0' in metrics  # every front end's, summed
        if api_processes:
            _kill_engine_core(tmp_path / "serve.log")
            deadline = time.monotonic() + 10
            while raw_http.request(url + "/health", timeout=5)[0] != 503:
                assert time.monotonic() < deadline, "/health still answers 200 without the engine core"
                time.sleep(0.1)
            assert process.poll() is None  # the front ends go on answering (503) until stopped
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
            stopped = True
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            stopped = False
        log.close()
    assert stopped, "pie serve did not stop within 20 s of SIGTERM:\n" + (tmp_path / "serve.log").read_text()[-3000:]


def test_the_time_slice_reaches_every_front_ends_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_server.app.cli import build_parser
    from pie_server.app.commands import serve

    args = build_parser().parse_args(["serve", "--inferlet-time-slice-ms", "20"])
    monkeypatch.setenv(serve.RUNTIME_ENV_VAR, json.dumps(serve._runtime_limits(args, 2)))
    assert serve._runtime_config().epoch_tick_s == pytest.approx(0.020)
    default = build_parser().parse_args(["serve"])
    monkeypatch.setenv(serve.RUNTIME_ENV_VAR, json.dumps(serve._runtime_limits(default, 2)))
    assert serve._runtime_config().epoch_tick_s == pytest.approx(0.005)


@pytest.mark.parametrize("value", ["0", "-5", "5000"])
def test_a_bad_time_slice_is_a_clean_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pie_server.app.cli import main

    interval = sys.getswitchinterval()
    assert main(["serve", "--port", "1", "--inferlet-time-slice-ms", value]) == 2
    assert "--inferlet-time-slice-ms must be in (0, 1000]" in capsys.readouterr().out
    assert sys.getswitchinterval() == interval  # an error changes nothing in the calling process

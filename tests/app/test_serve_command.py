"""`pie serve` as a user starts it: a subprocess on a loopback port, polled until /health is 200."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.app import raw_http


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_pie_serve_subprocess(tiny_llama_dir: Path, default_inferlet_wasm: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    pie = Path(sys.executable).with_name("pie")  # the installed console script, as a user runs it
    command = [str(pie), "serve", "--model", str(tiny_llama_dir), "--port", str(port),
               "--num-pages", "64", "--api-key", "k1", "--served-model-name", "tiny",
               "--default-inferlet", str(default_inferlet_wasm), "--log-level", "warning"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ))
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if raw_http.request(url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "pie serve did not become healthy"
            time.sleep(0.2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert process.returncode is not None

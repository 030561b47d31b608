"""`pie serve` as a subprocess on a free loopback port, for tests of the process itself (signals, a killed
engine core): started, polled until /health is 200, stopped."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.app import raw_http


class ServeProcess:
    def __init__(self, args: list[str], log_path: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        pie = Path(sys.executable).with_name("pie")  # the installed console script, as a user runs it
        self._log = log_path.open("w")
        self.process = subprocess.Popen([str(pie), "serve", "--port", str(self.port), "--log-level", "info", *args],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.health() != 200:
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, "pie serve did not become healthy"
            time.sleep(0.2)

    def health(self) -> int:
        try:
            return raw_http.request(self.url + "/health", timeout=5)[0]
        except OSError:
            return 0

    def core_pids(self) -> list[int]:
        """The engine cores that said they were ready, in order."""
        return [int(pid) for pid in re.findall(r"engine core \(process (\d+)\) ready", self.log())]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextmanager
def healthy_server(args: list[str], log_path: Path) -> Iterator[ServeProcess]:
    """A started `pie serve` once /health is 200; stopped on the way out, also when it never got healthy."""
    served = ServeProcess(args, log_path)
    try:
        served.wait_healthy()
        yield served
    finally:
        served.stop()

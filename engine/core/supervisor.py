"""Keeps the engine-core process running for the serving process (`pie serve --api-processes N`, N >= 1).

A core that ends while the server runs (killed, crashed, out of memory) is started again with the same spec at
the same address; start_core writes the new pid to `<run_dir>/core.pid`. The front ends notice the old core's
end on their own (RemoteControl fails every waiting call; /health answers 503) and connect to the new one
(app/state.py `_watch`). Decision: restart the core only, never the front ends, and give up after
MAX_RESTARTS within WINDOW_S (a core that can no longer load its model must not spin): the front ends then
keep answering 503 with the core's load error.
"""
from __future__ import annotations

import logging
import threading
import time
from multiprocessing.process import BaseProcess

from pie_server.engine.core.process import CoreSpec, start_core

log = logging.getLogger(__name__)

POLL_S = 0.5
MAX_RESTARTS = 5
WINDOW_S = 300.0


class CoreSupervisor:
    def __init__(self, spec: CoreSpec) -> None:
        self.spec = spec
        self.num_restarts = 0
        self._restarts: list[float] = []  # monotonic times of the restarts within WINDOW_S
        self._stopping = threading.Event()
        self._process, self.address = start_core(spec)
        self._thread = threading.Thread(target=self._watch, name="core-supervisor", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops watching, then ends the core (SIGTERM, then SIGKILL after timeout_s)."""
        self._stopping.set()
        self._thread.join()
        self._process.terminate()
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            if self._process.is_alive():
                continue
            if not self._may_restart():
                log.error("the engine core ended (exit code %s) %d times within %.0f s: not restarted again",
                          self._process.exitcode, MAX_RESTARTS, WINDOW_S)
                return
            log.error("the engine core (process %s) ended with exit code %s: restarting it", self._process.pid,
                      self._process.exitcode)
            self._process = self._start()

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < WINDOW_S]
        return len(self._restarts) < MAX_RESTARTS

    def _start(self) -> BaseProcess:
        process, address = start_core(self.spec)
        self._restarts.append(time.monotonic())
        self.num_restarts += 1
        self.address = address
        return process


"""`pie serve`'s uvicorn server with a drain: the first SIGTERM (or Ctrl-C) does not stop the server at once.

Decision: on the first signal the app answers every new request 503 (and /health 503, so a load balancer stops
sending), the requests in flight (streams included) run to their end, at most DRAIN_TIMEOUT_S, then uvicorn's own
graceful shutdown runs and the process exits 0. A second signal is uvicorn's own (stop now). uvicorn alone would
close the listening socket at once (new clients: connection refused) and re-raise the signal after its shutdown
(exit status 143 instead of 0).

With several front-end processes (serve_workers) uvicorn's manager runs them and, on the signal, sends each
SIGTERM; each worker is a DrainingServer, so each drains as above while the manager waits for them. A second
signal to the manager is passed on to the workers (they stop at once).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.supervisors import multiprocess

log = logging.getLogger("pie.app")

DRAIN_TIMEOUT_S = 120.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = _app_state(self.config)
        if self._drain_deadline is not None or state is None:  # a second signal, or no app to drain
            super().handle_exit(sig, frame)
            return
        self._drain_deadline = time.monotonic() + self.drain_timeout_s
        state.begin_drain()  # before the log line: who reads "draining" in the log finds new requests refused
        log.info("signal %d: draining %d requests in flight (at most %.0f s)", sig, state.num_in_flight,
                 self.drain_timeout_s)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            state = _app_state(self.config)
            if state is None or state.num_in_flight == 0 or time.monotonic() >= self._drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)


def _app_state(config: uvicorn.Config) -> Any:
    """The AppState of the app uvicorn serves (under uvicorn's wrappers), or None before it is loaded."""
    app = getattr(config, "loaded_app", None)
    for _ in range(16):
        state = getattr(getattr(app, "state", None), "pie", None)
        if state is not None:
            return state
        app = getattr(app, "app", None)
    return None


def serve(config: uvicorn.Config) -> None:
    """uvicorn.run for one process, with the drain."""
    DrainingServer(config).run()


def serve_workers(config: uvicorn.Config) -> None:
    """uvicorn.run with config.workers processes (config.app an import string), each with the drain.

    uvicorn's Multiprocess builds every worker it starts (and restarts) from its module's Process class, whose
    `server` is a plain uvicorn.Server: replacing that class is the one hook it has (uvicorn is pinned in the
    lock; tests/app/test_sigterm.py fails if a new version stops honouring it). The child gets the pickled
    _DrainingProcess and builds its DrainingServer there."""
    assert config.workers > 1 and isinstance(config.app, str)
    multiprocess.Process = _DrainingProcess  # type: ignore[misc]
    _DrainingManager(config, sockets=[config.bind_socket()]).run()


class _DrainingProcess(multiprocess.Process):
    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(self.config)
        return self._server


class _DrainingManager(multiprocess.Multiprocess):
    def join_all(self) -> None:
        """Waits while the workers drain (each has its own deadline); a signal meanwhile is sent on to them."""
        while any(process.process.is_alive() for process in self.processes):
            if self.signal_queue:
                log.info("signal %d while draining: stopping the workers now", self.signal_queue[-1])
                self.signal_queue.clear()
                for process in self.processes:
                    if process.process.is_alive() and process.pid is not None:
                        os.kill(process.pid, signal.SIGTERM)
            time.sleep(0.1)
        super().join_all()

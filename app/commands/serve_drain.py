"""`pie serve`'s uvicorn server with a drain (one HTTP process: --api-processes 0 or 1): the first SIGTERM (or
Ctrl-C) does not stop the server at once.

Decision: on the first signal the app answers every new request 503 (and /health 503, so a load balancer stops
sending), the requests in flight (streams included) run to their end, at most DRAIN_TIMEOUT_S, then uvicorn's own
graceful shutdown runs and the process exits 0. A second signal is uvicorn's own (stop now). uvicorn alone would
close the listening socket at once (new clients: connection refused) and re-raise the signal after its shutdown
(exit status 143 instead of 0).
"""
from __future__ import annotations

import logging
import time
from types import FrameType
from typing import Any

import uvicorn

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
        log.info("signal %d: draining %d requests in flight (at most %.0f s)", sig, state.num_in_flight,
                 self.drain_timeout_s)
        state.begin_drain()

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
    """uvicorn.run for one process, with the drain. (Several worker processes keep uvicorn's own Multiprocess,
    whose workers stop without a drain: not done.)"""
    DrainingServer(config).run()

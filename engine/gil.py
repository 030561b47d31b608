"""The GIL's switch interval in the server's processes (`pie serve`: the one process, each front end, the engine
core).

A thread that wants the GIL gets it when the holder gives it up, which a busy Python thread does only every
`sys.getswitchinterval()`, 5 ms by default. In a front end every host call of a Wasm guest is a ctypes callback
that must take the GIL again, so while another thread is busy (the event loop streaming tokens) each call can
wait up to that long: on the 2-core CPU machine, the default inferlet's start (launch to its "prompt" event,
about 15 host calls) took 2.8 ms alone, 79-82 ms beside one busy thread and 253 ms beside two; with 0.5 ms,
16 and 31 ms (0.2 ms: 12 and 18 ms). The H100 trace of 2026-12-06 had the same start at a median of 54-240 ms
under load. 0.5 ms: the start alone stays at 2.8-3.1 ms; docs/decisions/gil-switch-interval.md.

The engine core keeps Python's 5 ms (CORE_SWITCH_INTERVAL_S): it runs no guests, and on an H100 (2026-12-06, SmolLM2,
2 front ends, one run each) 0.5 ms everywhere cost throughput against 5 ms everywhere (c=16 5,192 against 6,817
tok/s, c=64 11,007 against 11,898; TPOT at c=1 1.63 against 1.32 ms, the core's host time per step) while it
shortened the front ends' inferlet starts only somewhat (median at 33-128 in flight 133 against 173 ms).

`PIE_GIL_SWITCH_INTERVAL_MS` overrides the value in every process (front ends and engine core), for A/B runs.
"""
from __future__ import annotations

import os
import sys

SWITCH_INTERVAL_S = 0.0005  # the front ends and the one-process server
CORE_SWITCH_INTERVAL_S = 0.005  # the engine core: Python's default
ENV_VAR = "PIE_GIL_SWITCH_INTERVAL_MS"


def server_switch_interval_s(default_s: float = SWITCH_INTERVAL_S) -> float:
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw == "":
        return default_s
    try:
        interval_ms = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r}: not a number of milliseconds") from None
    if not 0 < interval_ms <= 1000:
        raise ValueError(f"{ENV_VAR}={raw!r}: must be in (0, 1000] milliseconds")
    return interval_ms / 1000


def set_server_switch_interval(default_s: float = SWITCH_INTERVAL_S) -> None:
    sys.setswitchinterval(server_switch_interval_s(default_s))

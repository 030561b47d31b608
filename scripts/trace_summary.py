"""Summarises PIE_REQUEST_TRACE files (app/request_trace.py): per band of load (the HTTP requests in flight in the
request's front end when its run began), the median and p90 of each phase's share of the time to first token
(admitted -> submitted: the "go" message and the inferlet until `generate`; submitted -> received: the engine
core; received -> first_token: the way back through the front end).

    python scripts/trace_summary.py PATH     # reads PATH.* (one file per front-end process)
"""
from __future__ import annotations

import glob
import json
import statistics
import sys

from pie_server.app.request_trace import ENGINE_PHASES, PHASES

BANDS = ((1, 1), (2, 8), (9, 32), (33, 128), (129, 1 << 30))


def main() -> None:
    path = sys.argv[1]
    rows = [json.loads(line) for name in sorted(glob.glob(f"{path}.*")) for line in open(name)]
    # The runtime's phases only where every request has them (an inferlet without `generate` has none).
    phases = [p for p in PHASES if p not in ENGINE_PHASES or all(p in r for r in rows)]
    print(f"{len(rows)} requests; per phase: ms since the previous one, median / p90 (tail: the requests of the band "
          "whose first token came at or after its p90, median / max)")
    print(f"{'in flight':>10} {'n':>5} " + " ".join(f"{p:>17}" for p in phases))
    for low, high in BANDS:
        band = [r for r in rows if low <= r["in_flight"] <= high and all(p in r for p in phases)]
        if not band:
            continue
        label = f"{low}" if low == high else f"{low}-{high if high < 1 << 30 else ''}"
        print(f"{label:>10} {len(band):5d} " + " ".join(f"{c:>17}" for c in _cells(band, phases, 0.9)))
        p90 = sorted(r["first_token"] for r in band)[int(len(band) * 0.9)]
        tail = [r for r in band if r["first_token"] >= p90]
        print(f"{'tail':>10} {len(tail):5d} " + " ".join(f"{c:>17}" for c in _cells(tail, phases, 1.0)))


def _cells(rows: list[dict], phases: list[str], upper: float) -> list[str]:
    """Per phase: the median and the `upper` quantile (1.0: the max) of its span."""
    cells = []
    for i, phase in enumerate(phases):
        spans = sorted(r[phase] - (r[phases[i - 1]] if i else 0.0) for r in rows)
        cells.append(f"{statistics.median(spans):8.1f} / {spans[min(len(spans) - 1, int(len(spans) * upper))]:6.1f}")
    return cells


if __name__ == "__main__":
    main()

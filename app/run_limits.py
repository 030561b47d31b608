"""A run's own sandbox limits: the optional `"limits"` object of POST /v1/inferlets/{ref}/runs and of the
WebSocket's first frame, `{"time_budget_s", "memory_mib", "max_pages"}`. Each is positive and at most the
server's maximum (its `pie serve` flag); a limit left out is the server's. Anything else is a 400 naming the
field (and the maximum)."""
from __future__ import annotations

from typing import Any

from pie_server.app.errors import ApiError, invalid
from pie_server.engine.runtime.config import InstanceLimits, LimitError

MIB = 1 << 20
# API name -> (InstanceLimits field, whether it is a whole number, the serve flag that sets its maximum)
FIELDS: dict[str, tuple[str, bool, str]] = {
    "time_budget_s": ("time_budget_s", False, "--inferlet-time-budget"),
    "memory_mib": ("memory_limit_bytes", True, "--inferlet-memory-mib"),
    "max_pages": ("max_pages", True, "--inferlet-max-pages"),
}


def parse_limits(raw: Any) -> InstanceLimits | None:
    """The request's limits (None when it sets none); ApiError 400 for a malformed one."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid(f"limits must be an object with any of {', '.join(FIELDS)}", param="limits")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in FIELDS:
            raise invalid(f"unknown limit {name!r}; the limits are {', '.join(FIELDS)}", param=f"limits.{name}")
        field, whole, _ = FIELDS[name]
        if value is None:
            continue
        number = isinstance(value, int) if whole else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not value > 0:  # `not > 0` also refuses NaN
            raise invalid(f"limits.{name} must be a positive {'integer' if whole else 'number'}",
                          param=f"limits.{name}")
        values[field] = value * MIB if name == "memory_mib" else value
    return InstanceLimits(**values) if values else None


def limit_error(error: LimitError) -> ApiError:
    """The runtime's refusal of a limit above its maximum, in the API's names and units."""
    name = next(api for api, (field, _, _) in FIELDS.items() if field == error.field)
    maximum = error.maximum // MIB if name == "memory_mib" else error.maximum
    return invalid(f"limits.{name} is above this server's maximum of {maximum:g} (set by `pie serve "
                   f"{FIELDS[name][2]}`)", param=f"limits.{name}", code="limit_exceeded")

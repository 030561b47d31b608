"""Early validation of JSON schemas (response_format, forced tool calls): a schema the grammar engine
cannot compile is a 400 before any instance starts."""
from __future__ import annotations

from typing import Any

from pie_server.app.errors import invalid


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    from pie_server.engine.grammar import json_schema_problem

    problem = json_schema_problem(schema)
    if problem is not None:
        raise invalid(f"'{param}' holds a JSON schema that cannot be used: {problem}", param)

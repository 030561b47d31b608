"""Constraints on what `generate` may produce, enforced in the host at every step (a per-step token mask).

AllowedTokens is a static mask; JsonSchema and Regex are grammars (llguidance, host-side): the generation
ends when the value or match is complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Union

from wit_world.imports import generate


@dataclass(frozen=True)
class AllowedTokens:
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("AllowedTokens needs at least one token id")


@dataclass(frozen=True)
class JsonSchema:
    """One JSON value valid against the schema (a dict, or JSON text); {"type": "object"}: any object."""

    schema: Mapping[str, Any] | str

    def __post_init__(self) -> None:
        if isinstance(self.schema, str):
            json.loads(self.schema)  # a ValueError here beats a host error later


@dataclass(frozen=True)
class Regex:
    """The whole output matches the pattern (Rust regex syntax)."""

    pattern: str

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("Regex needs a pattern")


Constraint = Union[AllowedTokens, JsonSchema, Regex]


def to_wit(constraint: Constraint | None) -> generate.Constraint | None:
    if constraint is None:
        return None
    if isinstance(constraint, AllowedTokens):
        return generate.Constraint_AllowedTokens([int(t) for t in constraint.token_ids])
    if isinstance(constraint, JsonSchema):
        schema = constraint.schema
        return generate.Constraint_JsonSchema(schema if isinstance(schema, str) else json.dumps(schema))
    if isinstance(constraint, Regex):
        return generate.Constraint_Regex(constraint.pattern)
    raise TypeError(f"not a constraint: {constraint!r} (use AllowedTokens, JsonSchema or Regex)")

"""The wire between front ends and the engine core: msgspec msgpack over ZMQ PUSH/PULL sockets.

Front end -> core: one `Call` per Control method call (method name + its arguments as plain data; the core
converts them to the method's types, so a malformed call is a validation error, not a crash).
Core -> front end: a list of `Event`s per message, in the order they happened (a decode's plain tokens, those
without logprobs, travel together as one `Tokens` array at the message's head); the core sends at most one
message per front end per engine step (all of that step's sampled tokens together), plus replies to calls
as they are served.

Decisions: msgpack arrays (array_like structs) rather than pickle, so a decode token costs about ten bytes and
no Python object tree is rebuilt; PUSH/PULL rather than REQ/REP, because replies to calls come back in any
order and most messages (the tokens of a running decode) answer no call.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from pie_server.engine.config import EngineInfo
from pie_server.engine.control.api import ControlStats, VirtualForward


class Call(msgspec.Struct, array_like=True):
    front_id: int
    call_id: int
    method: str
    args: list[Any]


class Reply(msgspec.Struct, array_like=True, tag=1):
    """The answer to call_id: its value, or the error it raised as [class name, message]."""

    call_id: int
    value: Any = None
    error: list[str] | None = None


class Output(msgspec.Struct, array_like=True, tag=2):
    """One sampled token of the decode started by call_id."""

    call_id: int
    token_id: int
    logprob: float | None = None
    # A tuple (not a list): as OutputResult's, so neither end copies it per token; the same msgpack array.
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Tokens(msgspec.Struct, array_like=True, tag=4):
    """Sampled tokens of decodes that asked for no logprobs, in the order they were sampled: flat pairs
    [call_id, token_id, call_id, token_id, ...]. One per message at most, before its other events: a decode's
    tokens then always come before its End (FrontLink.flush)."""

    pairs: list[int]


class End(msgspec.Struct, array_like=True, tag=3):
    """The decode started by call_id has ended: nothing of it runs any more."""

    call_id: int
    reason: str | None = None
    error: list[str] | None = None


Event = Union[Reply, Output, Tokens, End]


class CoreFacts(msgspec.Struct):
    """What a front end learns from the core when it connects."""

    model_name: str
    model_dir: str
    vocab_size: int
    info: EngineInfo
    admission_pages: int
    can_decode_grammar: bool = False  # the core's control layer runs decodes under a grammar (DecodeRequest.grammar)


# Controller methods served as they are: name -> argument types. The value (or error) is the reply.
PLAIN_METHODS: dict[str, Any] = {
    "open_instance": tuple[str, int | None],
    "close_instance": tuple[str],
    "try_allocate_pages": tuple[str, int],
    "free_pages": tuple[str, list[int]],
    "copy_slots": tuple[str, int, int, int, int, int],
    "mask_slots": tuple[str, int, list[bool]],
    "share_pages": tuple[str, list[int]],
    "export_pages": tuple[str, list[int], str],
    "import_pages": tuple[str, str],
    "unexport_pages": tuple[str],
    "list_exports": tuple[()],
    "page_usage": tuple[str, list[int] | None],
    "prefix_lookup": tuple[str, list[int]],
    "prefix_publish": tuple[str, list[int], list[int]],
    "clear_prefix_cache": tuple[()],
    "stats": tuple[()],
}
# The replies' value types of those that answer more than None.
PLAIN_VALUES: dict[str, Any] = {
    "try_allocate_pages": list[int],
    "share_pages": list[int],
    "import_pages": list[int],
    "list_exports": list[str],
    "page_usage": tuple[int, int, int],
    "prefix_lookup": tuple[list[int], int],
    "stats": ControlStats,
}
# Controller methods that return a Future: the reply comes when it settles.
FUTURE_METHODS: dict[str, Any] = {
    "allocate_pages": tuple[str, int],
    "forward": tuple[str, VirtualForward],
}


def error_of(exc: BaseException) -> list[str]:
    return [type(exc).__name__, str(exc)]


ENCODER = msgspec.msgpack.Encoder()
CALL_DECODER = msgspec.msgpack.Decoder(Call)
EVENTS_DECODER = msgspec.msgpack.Decoder(list[Event])

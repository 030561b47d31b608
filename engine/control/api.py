"""The control layer's interface, as the runtime (Wasm host) and tests use it.

Instances name pages with their own VirtualPageIds; the control layer maps them to physical pages with
reference counts. Calls validate their arguments and raise ControlError (returned to the inferlet as an
error, never a crash). Calls that may wait for pages or for the executor return a Future.

Sharing invariant: a page with more than one reference (fork, export/import, prefix cache) is read-only;
a forward whose new tokens would be written into such a page fails with ControlError (copy it first).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from pie_server.engine.config import EngineInfo
from pie_server.engine.step import CommandResult, OutputSpec
from pie_server.engine.types import InstanceId, Position, TokenId, VirtualPageId

if TYPE_CHECKING:
    from pie_server.engine.control.decoding import DecodeRequest, DecodeStream


class ControlError(Exception):
    """An instance asked for something invalid (bad page id, over quota, bad shapes)."""


# Every error about pages whose KV the last resort of preemption dropped starts with this (docs/reliability.md):
# the instance lives on, and a caller that knows the tokens (pie_sdk's Context) computes them again.
KV_EVICTED = "KV evicted"


class InstanceClosed(ControlError):
    """The instance was closed (finished, killed or its client went away); its pending work is dropped."""


@dataclass(frozen=True)
class VirtualForward:
    """A forward pass as an instance states it: ForwardCommand with virtual page ids."""

    token_ids: Sequence[TokenId]
    positions: Sequence[Position]
    page_ids: Sequence[VirtualPageId]
    last_page_len: int
    outputs: Sequence[OutputSpec] = ()
    attention_mask: Sequence[Sequence[bool]] | None = None


@dataclass(frozen=True)
class ControlStats:
    num_pages: int
    num_free_pages: int
    num_instances: int
    num_running: int  # instances with a forward in the current or next batch
    num_waiting: int  # instances waiting for pages
    num_swapped: int  # instances preempted to host memory
    num_prefix_queries: int
    num_prefix_hit_tokens: int
    num_prefix_query_tokens: int
    num_evictions: int = 0  # instances whose KV the last resort of preemption dropped (KV_EVICTED), since start


class Control(Protocol):
    info: EngineInfo
    can_decode_grammar: bool  # decode() takes a DecodeRequest with a grammar

    def open_instance(self, instance_id: InstanceId, max_pages: int | None = None) -> None: ...

    def close_instance(self, instance_id: InstanceId) -> None:
        """Free every page reference of the instance and fail its pending futures with InstanceClosed."""

    def try_allocate_pages(self, instance_id: InstanceId, num_pages: int) -> list[VirtualPageId]:
        """num_pages at once if they are free and nobody waits for pages; else none (never a preemption)."""

    def allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Future[list[VirtualPageId]]:
        """Resolves once the pages exist; waits (or preempts others) when the pool is full, never fails for that."""

    def free_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> None: ...

    def copy_slots(self, instance_id: InstanceId, src_page_id: VirtualPageId, dst_page_id: VirtualPageId,
                   src_offset: int, dst_offset: int, num_slots: int) -> None:
        """Copy KV slots (ordered before the instance's next forward)."""

    def mask_slots(self, instance_id: InstanceId, page_id: VirtualPageId, slot_mask: Sequence[bool]) -> None:
        """Hide (False) or show (True) slots of a page from the instance's later forwards."""

    def share_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> list[VirtualPageId]:
        """New virtual ids for the same physical pages (fork): refcount + 1 each."""

    def export_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId], name: str) -> None: ...

    def import_pages(self, instance_id: InstanceId, name: str) -> list[VirtualPageId]: ...

    def unexport_pages(self, name: str) -> None: ...

    def list_exports(self) -> list[str]: ...

    def page_usage(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId] | None
                   ) -> tuple[int, int, int]:
        """(ids, distinct physical pages they name, of those the ones referenced more than once anywhere)
        for page_ids (None: every page the instance holds)."""

    def prefix_lookup(self, instance_id: InstanceId, token_ids: Sequence[TokenId]) -> tuple[list[VirtualPageId], int]:
        """Share into the instance the pages of the longest cached page-aligned prefix of token_ids;
        returns (pages, number of tokens they hold)."""

    def prefix_publish(self, instance_id: InstanceId, token_ids: Sequence[TokenId],
                       page_ids: Sequence[VirtualPageId]) -> None:
        """Offer the full pages holding token_ids (positions 0..len-1, page-aligned) to the prefix cache."""

    def forward(self, instance_id: InstanceId, command: VirtualForward) -> Future[CommandResult]:
        """Queue a forward pass for the next batch; resolves with its outputs."""

    def decode(self, instance_id: InstanceId, request: "DecodeRequest") -> "DecodeStream":
        """Decode one sequence in the control layer, a forward per step with no round trip per token
        (engine/control/decoding.py); raises ControlError when its first forward is invalid, or when it has a
        grammar and can_decode_grammar is False."""

    def extend_decode(self, instance_id: InstanceId, stream: "DecodeStream", page_ids: Sequence[VirtualPageId],
                      num_pages_before: int) -> None:
        """Give a running decode of num_pages_before pages more room: page_ids (allocated to the instance) follow
        them. One that ended meanwhile, or ends at its old room before this reaches it, ends as before (END_ROOM)."""

    def stop_decode(self, instance_id: InstanceId, stream: "DecodeStream") -> None:
        """End a decode early (its stream's done says when nothing of it runs any more)."""

    def stats(self) -> ControlStats: ...


def call_later(control: Control, method: str, *args: Any) -> Future[Any]:
    """One of Control's calls that answer at once (a value, or None), as a Future: a Control whose calls cross
    a process boundary (engine/core/client.py's RemoteControl, `call_later`) sends it and returns without
    waiting for the reply, so the caller's thread (the runtime's scheduler, serving every instance) is not
    held for a round trip; any other Control runs it now."""
    later = getattr(control, "call_later", None)
    if later is not None:
        return later(method, *args)
    future: Future[Any] = Future()
    try:
        future.set_result(getattr(control, method)(*args))
    except Exception as error:
        future.set_exception(error)
    return future

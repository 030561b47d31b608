"""Per-instance state kept by the host, and the host-call task it may be suspended in."""
from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from pie_server.engine.runtime.config import InstanceLimits
from pie_server.engine.runtime.messages import Mailbox, Message, message_bytes
from pie_server.engine.types import InstanceId

HostTaskGen = Generator[Any, Any, Any]
"""A host call that waits: yields a Future (or a list of them), receives its result (or a list of results,
exceptions in place of failed ones), returns the WIT result value."""

_slots = itertools.count(1)


@dataclass
class HostTask:
    gen: HostTaskGen
    name: str
    schema: Any
    results_ptr: Any  # where the continuation writes the result (None for functions without results)
    done: bool = False
    value: Any = None
    internal_error: str | None = None


@dataclass(eq=False)
class InstanceState:
    id: InstanceId
    program_hash: str
    arguments: tuple[str, ...]
    tenant: str
    deadline: float  # time.monotonic() after which the instance is stopped
    limits: InstanceLimits = field(default_factory=InstanceLimits)  # resolved at launch (RuntimeConfig.limits_for)
    slot: int = field(default_factory=lambda: next(_slots))  # the C continuation's env
    outbox: Mailbox[Message] = field(default_factory=lambda: Mailbox(message_bytes))  # counts its bytes
    inbox: Mailbox[str] = field(default_factory=Mailbox)
    broadcasts: Mailbox[tuple[str, str]] = field(default_factory=Mailbox)
    topics: set[str] = field(default_factory=set)
    decoder_reps: set[int] = field(default_factory=set)
    # http fetch-start handle -> its concurrent.futures.Future; fetch-wait takes it out (each is waited for once)
    pending_fetches: dict[int, Any] = field(default_factory=dict)
    num_fetches_started: int = 0  # the last handle given
    log: bytearray = field(default_factory=bytearray)  # WASI stdout+stderr, first `max_log_bytes` kept
    log_path: str | None = None  # where the log is written when the instance ends (if a log_dir is set)
    # wasmtime objects, owned by the scheduler thread
    store: Any = None
    component_instance: Any = None
    call: Any = None  # ffi_async.CallFuture of instantiation, then of run()
    call_outcome: Callable[[], Any] | None = None
    phase: str = "starting"  # starting | instantiating | running | finished
    task: HostTask | None = None
    context_ptr: Any = None  # the store context of the host call being served
    kill_reason: str | None = None  # set to stop the instance after the current poll
    # A warm instance (engine/runtime/warm.py), started ahead of its launch: runtime.arguments waits on this
    # Future, which its launch completes (after setting arguments, tenant and deadline). None: a plain launch.
    launched: Future[None] | None = None
    parked: bool = False  # a warm instance waiting in runtime.arguments for its launch
    background: bool = False  # polled only when nothing else can run (a warm instance until its launch)
    # A request trace's marks (app/request_trace.py), when the server traces: the generate path adds when its
    # decodes went to the engine ("submitted") and when their first outputs came back ("received").
    trace_marks: dict[str, float] | None = None
    polled_s: float = 0.0  # wall time spent in its polls (the scheduler's young/old order; reset at a warm launch)
    counted: bool = True  # in its tenant's live instances (TenantInstances); a warm instance from its launch
    on_exit: list[Callable[["InstanceState"], None]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.phase == "finished"

    @property
    def over_budget_reason(self) -> str:
        budget = self.limits.time_budget_s
        return "exceeded its time budget" + ("" if budget is None else f" of {budget:g} s")

"""The inferlet runtime: load components, launch instances, talk to them.

Public API (for the HTTP layer and the CLI):
    runtime = Runtime(control, tokenizer, model_info, RuntimeConfig())
    program_hash = runtime.load(wasm_bytes)
    handle = runtime.launch(program_hash, ["--prompt", "hi"], tenant="alice",
                            limits=InstanceLimits(time_budget_s=30))  # within the config's maxima
    await handle.next_message()   # Text | Event | ..., finally Terminated(ok, error)
    handle.get_message(timeout)   # the blocking variant (thread-safe)
    handle.send("client input"); handle.kill()
    runtime.keep_warm(program_hash, 8)   # launches with the default limits take instances started ahead
    runtime.close()
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import wasmtime

from pie_server.engine.control.api import Control, call_later
from pie_server.engine.grammar import LazyCompiler
from pie_server.engine.runtime import api_tokenize, ffi_async
from pie_server.engine.runtime.config import InstanceLimits, ModelInfo, RuntimeConfig
from pie_server.engine.runtime.host import Host, TenantStore
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.linker import build_linker
from pie_server.engine.runtime.messages import Message, Terminated
from pie_server.engine.runtime.programs import ProgramCache
from pie_server.engine.runtime.scheduler import Scheduler
from pie_server.engine.runtime.tenant_quota import QuotaControl, TenantInstances, TenantPages
from pie_server.engine.runtime.tokenizer import RuntimeTokenizer
from pie_server.engine.runtime.warm import WarmInstances
from pie_server.engine.types import InstanceId

log = logging.getLogger(__name__)
MAX_ARGUMENTS_BYTES = 1 << 20


class InstanceHandle:
    """The client's side of one instance. Thread-safe; next_message() is for one asyncio consumer."""

    def __init__(self, state: InstanceState, runtime: "Runtime") -> None:
        self._state = state
        self._runtime = runtime

    @property
    def id(self) -> InstanceId:
        return self._state.id

    @property
    def log_path(self) -> str | None:
        """The file the instance's WASI stdout and stderr go to when it ends (None without a log_dir)."""
        return self._state.log_path

    def log_text(self) -> str:
        """What the instance wrote to WASI stdout/stderr so far (the first max_log_bytes)."""
        return bytes(self._state.log).decode("utf-8", errors="replace")

    async def next_message(self) -> Message:
        return await self._state.outbox.aget()

    def try_next_message(self) -> Message | None:
        """A message that is already waiting, or None: never waits."""
        return self._state.outbox.try_get()

    def get_message(self, timeout: float | None = None) -> Message:
        """Blocking variant of next_message; raises TimeoutError."""
        return self._state.outbox.get(timeout)

    def messages(self, timeout: float | None = None) -> list[Message]:
        """Block until the instance ends; all its messages, Terminated last."""
        collected: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not collected or not isinstance(collected[-1], Terminated):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            collected.append(self.get_message(remaining))
        return collected

    def send(self, message: str) -> None:
        """A message from the client (the inferlet reads it with messaging.receive)."""
        limit = self._runtime.config.max_message_bytes
        if len(message.encode()) > limit:
            raise ValueError(f"message larger than {limit} bytes")
        if len(self._state.inbox) >= self._runtime.config.mailbox_capacity:
            raise ValueError("the instance's inbox is full")
        self._state.inbox.put(message)

    def trace_into(self, marks: dict[str, float]) -> None:
        """The generate path adds its marks to marks (app/request_trace.py); set before the instance generates."""
        self._state.trace_marks = marks

    def kill(self, reason: str = "killed by the client") -> None:
        self._runtime._scheduler.post(lambda: self._runtime._scheduler.kill(self._state, reason))


class Runtime:
    def __init__(self, control: Control, tokenizer: RuntimeTokenizer, model_info: ModelInfo,
                 config: RuntimeConfig | None = None, grammars: LazyCompiler | None = None) -> None:
        """grammars: the grammar compiler to share (the control layer's, in one process); None: its own."""
        ffi_async.check_wasmtime_version()
        self.config = config or RuntimeConfig()
        self.control = control
        self._tmp = tempfile.TemporaryDirectory(prefix="inferlet-runtime-")
        self._log_dir = None if self.config.log_dir is None else Path(self.config.log_dir)
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        self.engine = wasmtime.Engine(self._engine_config())
        self.programs = ProgramCache(self.engine, Path(self.config.cache_dir or Path(self._tmp.name) / "cache"),
                                     engine_key=f"wasmtime-{ffi_async.PINNED_WASMTIME}-epoch",
                                     max_bytes=self.config.compile_cache_bytes)
        self.tenant_instances = TenantInstances(self.config.max_instances_per_tenant)
        # Counted only under a quota: without one the host calls go to the control layer as they are.
        self.tenant_pages = None if self.config.max_pages_per_tenant is None \
            else TenantPages(self.config.max_pages_per_tenant)
        host_control = control if self.tenant_pages is None else QuotaControl(control, self.tenant_pages)
        self._io = ThreadPoolExecutor(max_workers=self.config.http_max_in_flight,
                                      thread_name_prefix="inferlet-io")
        self._scheduler = Scheduler(self.engine, self.config.epoch_tick_s, self._on_stop)
        self._host = Host(control=host_control, tokenizer=tokenizer, model=model_info, config=self.config,
                          call_later=self._scheduler.call_later, run_blocking=self._io.submit,
                          store=TenantStore(self.config.max_store_bytes_per_tenant), grammars=grammars)
        self._linker, self._callbacks = build_linker(self.engine, self._host, self._scheduler.make_callback)
        self._ids = itertools.count(1)
        self.warm = WarmInstances()
        self._closed = False

    def _engine_config(self) -> wasmtime.Config:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.memory_reservation = self.config.memory_limit_bytes
        return config

    # ------------------------------------------------------------------------------------------ API
    def load(self, wasm: bytes) -> str:
        """Compile (or find in the cache) a component; returns its program hash. ValueError if invalid."""
        return self.programs.load(wasm)

    def launch(self, program_hash: str, args: Sequence[str] = (), tenant: str = "default",
               on_exit: Callable[[InstanceState], None] | None = None,
               time_budget_s: float | None = None, limits: InstanceLimits | None = None) -> InstanceHandle:
        """Start an instance of a loaded program. limits: this instance's own (each at most the config's,
        else LimitError; time_budget_s is a shorthand for limits.time_budget_s). A launch over the tenant's
        quota of instances raises TenantQuotaError. on_exit runs in the scheduler thread when it ended."""
        if self._closed:
            raise RuntimeError("the runtime is closed")
        component = self.programs.get(program_hash)  # KeyError for an unknown (or evicted) program
        arguments = tuple(str(a) for a in args)
        if time_budget_s is not None:
            limits = dataclasses.replace(limits or InstanceLimits(), time_budget_s=time_budget_s)
        resolved = self.config.limits_for(limits)
        if sum(len(a.encode()) for a in arguments) > MAX_ARGUMENTS_BYTES:
            raise ValueError(f"arguments exceed {MAX_ARGUMENTS_BYTES} bytes")
        warm = self.warm.take(program_hash, resolved)
        if warm is not None:
            return self._launch_warm(warm, arguments, tenant, on_exit)
        assert resolved.time_budget_s is not None
        state = self._new_state(program_hash, arguments, tenant, resolved, time.monotonic() + resolved.time_budget_s)
        if on_exit is not None:
            state.on_exit.append(on_exit)
        self.tenant_instances.acquire(tenant)  # last: released by _on_stop, which every added instance reaches
        self._scheduler.post(lambda: self._scheduler.add(state, lambda s: self._start(s, component)))
        return InstanceHandle(state, self)

    def keep_warm(self, program_hash: str, num_instances: int) -> None:
        """Keep num_instances of the program started ahead of their launch (engine/runtime/warm.py); launches
        with the default limits take them. 0 stops starting new ones. KeyError for an unknown program."""
        if self._closed:
            raise RuntimeError("the runtime is closed")
        self.warm.keep(program_hash, self.programs.get(program_hash), self.config.limits_for(None), num_instances)
        self._start_warm(program_hash)

    def _start_warm(self, program_hash: str) -> None:
        num_missing, component, limits = self.warm.num_missing(program_hash)
        for _ in range(num_missing):
            assert limits is not None
            state = self._new_state(program_hash, (), "", limits, math.inf)
            state.launched, state.background, state.counted = Future(), True, False
            self.warm.add(program_hash, state)
            self._scheduler.post(lambda s=state: self._scheduler.add(s, lambda s: self._start(s, component)))

    def _launch_warm(self, state: InstanceState, arguments: tuple[str, ...], tenant: str,
                     on_exit: Callable[[InstanceState], None] | None) -> InstanceHandle:
        try:
            self.tenant_instances.acquire(tenant)
        except Exception:
            self.warm.give_back(state)
            raise
        self._scheduler.post(lambda: self._wake_warm(state, arguments, tenant, on_exit))
        self._start_warm(state.program_hash)  # its replacement
        return InstanceHandle(state, self)

    def _new_state(self, program_hash: str, arguments: tuple[str, ...], tenant: str, limits: InstanceLimits,
                   deadline: float) -> InstanceState:
        instance_id = InstanceId(f"inst-{next(self._ids)}-{uuid.uuid4().hex[:8]}")
        return InstanceState(id=instance_id, program_hash=program_hash, arguments=arguments, tenant=tenant,
                             deadline=deadline, limits=limits,
                             log_path=None if self._log_dir is None else str(self._log_dir / f"{instance_id}.log"))

    @property
    def num_instances(self) -> int:
        return self._scheduler.num_instances

    @property
    def num_polls(self) -> int:
        return self._scheduler.num_polls

    def close(self) -> None:
        """Stop every instance (their pages are freed) and the scheduler."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.shutdown()
        self._io.shutdown(wait=False, cancel_futures=True)
        self._tmp.cleanup()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------- scheduler thread
    def _start(self, state: InstanceState, component: Any) -> None:
        # Sent without waiting for an engine core's reply (call_later): its later calls are served after it.
        opened = call_later(self.control, "open_instance", state.id, state.limits.max_pages)
        if opened.done() and opened.exception() is not None:
            raise opened.exception()  # type: ignore[misc]
        opened.add_done_callback(lambda done: _log_failure(done, f"open_instance({state.id})"))
        if self.tenant_pages is not None and state.counted:  # a warm instance's tenant is known at its launch
            self.tenant_pages.open(state.id, state.tenant)
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=state.limits.memory_limit_bytes)
        store.set_epoch_deadline(1)
        ffi_async.epoch_yield_every(store, 1)
        wasi = wasmtime.WasiConfig()  # no preopens: no filesystem; sockets: no address is allowed
        capture = _log_writer(state, self.config.max_log_bytes)
        wasi.stdout_custom = capture
        wasi.stderr_custom = capture
        wasi.env = [list(pair) for pair in self.config.extra_wasi_env]
        store.set_wasi(wasi)
        state.store = store
        state.call, state.call_outcome = ffi_async.instantiate_async(self._linker, store, component)
        state.phase = "instantiating"

    def _wake_warm(self, state: InstanceState, arguments: tuple[str, ...], tenant: str,
                   on_exit: Callable[[InstanceState], None] | None) -> None:
        """The launch of a warm instance (tenant already counted): it goes on with these arguments."""
        if on_exit is not None:
            state.on_exit.append(on_exit)
        state.arguments, state.tenant, state.counted = arguments, tenant, True
        if state.finished:  # it ended meanwhile (a shutdown); its Terminated message says why
            self.tenant_instances.release(tenant)
            _run_exit_callbacks(state)
            return
        if self.tenant_pages is not None:
            self.tenant_pages.open(state.id, tenant)
        assert state.limits.time_budget_s is not None and state.launched is not None
        state.deadline = time.monotonic() + state.limits.time_budget_s
        state.parked = False
        self._scheduler.launch_warm(state)
        state.launched.set_result(None)

    def _on_stop(self, state: InstanceState, ok: bool, error: str | None) -> None:
        try:  # never let cleanup of one instance disturb the others
            closed = call_later(self.control, "close_instance", state.id)
            closed.add_done_callback(lambda done: _log_failure(done, f"close_instance({state.id})"))
        except Exception:
            log.exception("close_instance(%s) failed", state.id)
        if self.tenant_pages is not None:
            self.tenant_pages.close(state.id)
        if state.counted:
            self.tenant_instances.release(state.tenant)
        else:
            self.warm.discard(state)
        self._host.bus.drop(state)
        api_tokenize.drop_instance_decoders(self._host, state)
        if state.log_path is not None:
            try:
                Path(state.log_path).write_bytes(bytes(state.log))
            except OSError:
                log.exception("writing the log of %s failed", state.id)
        state.outbox.put(Terminated(ok=ok, error=error))
        if state.counted:  # a warm instance's callbacks come with its launch
            _run_exit_callbacks(state)


def _run_exit_callbacks(state: InstanceState) -> None:
    for callback in state.on_exit:
        try:
            callback(state)
        except Exception:
            log.exception("on_exit callback of %s failed", state.id)


def _log_failure(done: Future[Any], what: str) -> None:
    if done.exception() is not None:
        log.error("%s failed: %s", what, done.exception())


def _log_writer(state: InstanceState, limit: int) -> Callable[[bytes], int]:
    """WASI output capture: keeps the first `limit` bytes, reports everything as written."""
    def write(data: bytes) -> int:
        room = limit - len(state.log)
        if room > 0:
            state.log += data[:room]
        return len(data)
    return write

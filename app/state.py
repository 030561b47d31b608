"""The server's state, kept in the Starlette app's lifespan state (no globals): the engine, loaded in the
background so /health can answer 503 while it loads; the default inferlet's program; metrics; the slots that
bound how many inferlet instances run at once (the rest queue); whose a request is (its tenant); and which inferlet
a name means to a tenant (its own upload, else a built-in one: the default, or a preinstalled contrib inferlet,
built on first use). An engine that dies is restarted where it can be (a front end whose engine core the serving
process restarts: `_watch`); a drain (SIGTERM, app/commands/serve_drain.py) refuses new requests."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from pie_server.app.auth import TENANT_SCOPE_KEY
from pie_server.app.config import ServerConfig
from pie_server.app.engine_view import EngineView
from pie_server.app.errors import ApiError
from pie_server.app.inferlet_build import BuildError, default_cache_dir
from pie_server.app.inferlet_run import InferletRun, InstanceHandle, PromptInfo
from pie_server.app.inferlet_runs import RunRegistry
from pie_server.app.inferlet_store import BUILTIN_TENANT, InferletRecord, InferletStore, StoreError
from pie_server.app.metrics import EngineGauges, Metrics
from pie_server.app.preinstalled import PreinstalledInferlets, discover
from pie_server.app.request_trace import TraceWriter
from pie_server.engine.control.admission import Admission, pages_for
from pie_server.app.openai.params import INFERLET_MODEL_PREFIX, ModelLimits
from pie_server.engine.runtime.config import InstanceLimits
from pie_server.engine.runtime.tenant_quota import TenantQuotaError
from pie_server.inferlets import CONTRIB_DIR

log = logging.getLogger("pie.app")

EngineFactory = Callable[[], Any]
DEFAULT_INFERLET_NAME = "default"
WATCH_INTERVAL_S = 0.25  # how often a dead engine is looked for (RemoteControl notices a dead core in 0.2 s)
RESTART_RETRY_S = 1.0  # between attempts to connect to a restarted engine core
RESTART_TIMEOUT_S = 600.0  # then the server reports "failed" (a core that can no longer load its model)
RECONNECT_POLL_S = 0.05  # how often a restart looks whether its connection is made


class AppState:
    def __init__(self, engine_factory: EngineFactory, config: ServerConfig) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self.status = "loading"  # loading | ready | restarting | failed | stopped
        self.error: str | None = None
        self.view: EngineView | None = None
        self.limits: ModelLimits | None = None
        self.metrics = Metrics(config.served_model_names[0] if config.served_model_names else "",
                               multiprocess_dir=config.metrics_dir)
        self.metrics.read_engine_with(self.gauges)
        self.program_hash = ""
        self.num_running = 0
        self.num_queued = 0
        self._slots: asyncio.Semaphore | None = None
        self.admission: Admission | None = None  # the engine's (engine/control/admission.py), once loaded
        self._loader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.num_restarts = 0
        self.draining = False  # set by a drain: every new HTTP request is answered 503 (app/server.py)
        self.num_in_flight = 0  # HTTP requests being answered (app/server.py RequestGuard)
        self.inferlets = InferletStore(config.inferlet_dir or default_cache_dir().parent / "uploads")
        # The contrib folders present now, each under its folder name; built on first use, never here.
        self.preinstalled = PreinstalledInferlets(self.inferlets, discover(CONTRIB_DIR, {DEFAULT_INFERLET_NAME}))
        self.inferlets.retain(BUILTIN_TENANT, {DEFAULT_INFERLET_NAME, *self.preinstalled.names})
        self.program_hashes: dict[str, str] = {}  # uploaded inferlet id -> its program in this front end's runtime
        self._program_sources: dict[str, InferletRecord] = {}  # program -> an inferlet record of its Wasm bytes
        self.runs = RunRegistry()
        self.trace_writer = TraceWriter.from_env()  # PIE_REQUEST_TRACE: per-request phase times

    # lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start loading in the background; the server answers (503) meanwhile."""
        self._slots = asyncio.Semaphore(self.config.max_running_requests)
        self._loader = asyncio.create_task(self._load())
        self._watcher = asyncio.create_task(self._watch())

    def begin_drain(self) -> None:
        """From now on new requests get 503; those in flight go on (the server exits when they are done)."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.num_in_flight)
        self.draining = True

    async def wait_ready(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.runs.close()
        if self._loader is not None and not self._loader.done():
            await asyncio.wait([self._loader])  # a load in a thread cannot be interrupted
        if self.view is not None:
            await asyncio.to_thread(self.view.close)
        self.status = "stopped"

    async def _load(self) -> None:
        try:
            view = await asyncio.to_thread(self._load_engine)
        except Exception as exc:  # reported by /health and every request
            log.exception("the engine failed to start")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        names = self.config.served_model_names or (view.model_name,)
        self.limits = ModelLimits(model_names=names, vocab_size=view.vocab_size,
                                  max_context_len=view.max_context_len)
        self.metrics.model_name = names[0]
        self.admission = view.admission
        self.view, self.status = view, "ready"

    async def _watch(self) -> None:
        """Restarts a dead engine that can be restarted (EngineView.can_restart); meanwhile /health answers 503
        and requests fail at once (ready()); what ran on it has failed with the engine's error."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            view = self.view
            if self.status == "ready" and view is not None and view.can_restart and not view.alive():
                await self._restart(view)

    async def _restart(self, dead: EngineView) -> None:
        log.error("the engine has stopped; connecting to its restarted engine core")
        self.status, self.error = "restarting", "the engine stopped and is being restarted"
        await asyncio.to_thread(dead.close)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                view = await self._load_abandonably()
                break
            except Exception as exc:  # the core not yet restarted, or still loading
                if time.monotonic() > deadline:
                    log.exception("the engine could not be restarted")
                    self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
                    return
                await asyncio.sleep(RESTART_RETRY_S)
        # Uploaded programs are loaded again on their next launch (launch: KeyError -> _load_again).
        self.admission, self.view, self.status, self.error = view.admission, view, "ready", None
        self.num_restarts += 1
        log.info("the engine is back (restart %d)", self.num_restarts)

    async def _load_abandonably(self) -> EngineView:
        """_load_engine in a daemon thread that a stop does not wait for. Decision: a front end's connection to a
        restarted core waits until that core has loaded its model, and the serving process stops the core only
        after its front ends have exited; joined at exit (as asyncio.to_thread's threads are), it held SIGTERM up
        for as long as the new core took to load. A view that arrives after the stop is closed, not leaked."""
        loading: concurrent.futures.Future[EngineView] = concurrent.futures.Future()

        def load() -> None:
            try:
                loading.set_result(self._load_engine())
            except BaseException as exc:  # delivered to the awaiting task
                loading.set_exception(exc)

        threading.Thread(target=load, name="engine-reconnect", daemon=True).start()
        try:  # polled rather than wrapped (asyncio.wrap_future): the thread may finish after this loop has closed
            while not loading.done():
                await asyncio.sleep(RECONNECT_POLL_S)
        except asyncio.CancelledError:
            loading.add_done_callback(_close_late_view)
            raise
        return loading.result()

    def _load_engine(self) -> EngineView:
        view = EngineView(self._engine_factory())
        try:
            wasm = self._default_inferlet_wasm()
            self.program_hash = view.load_program(wasm)
            view.keep_warm(self.program_hash, self.config.warm_instances)
        except Exception:
            view.close()
            raise
        # Preinstalled, for every tenant: "model": "inferlet:default" names it, and /v1/inferlets lists it.
        self.remember_program(self.inferlets.put(wasm, DEFAULT_INFERLET_NAME, BUILTIN_TENANT), self.program_hash)
        return view

    def _default_inferlet_wasm(self) -> bytes:
        if self.config.inferlet_wasm is not None:
            return Path(self.config.inferlet_wasm).read_bytes()
        from pie_server.app.inferlet_build import build_inferlet  # componentize-py, cached by content hash

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "default.wasm"
            build_inferlet(self.config.inferlet_source, out)
            return out.read_bytes()

    # requests ------------------------------------------------------------------------------------
    def tenant_of(self, request: Any) -> str:
        """Whose inferlets, runs, exports and store a request sees: its API key's tenant (app/auth.py), or the
        one default tenant when the server has no keys."""
        return request.scope.get(TENANT_SCOPE_KEY) or self.config.tenant

    def remember_program(self, record: InferletRecord, program_hash: str) -> None:
        self.program_hashes[record.id] = program_hash
        self._program_sources[program_hash] = record

    async def program_hash_of(self, record: InferletRecord) -> str:
        """The uploaded inferlet's program in this front end's runtime (compiled once; the runtime caches the
        compiled code on disk, so another front end or a restart loads it without compiling)."""
        program_hash = self.program_hashes.get(record.id)
        if program_hash is None:
            view, _ = self.ready()
            wasm = await asyncio.to_thread(self.inferlets.wasm, record)
            try:
                program_hash = await asyncio.to_thread(view.load_program, wasm)
            except (OSError, ValueError) as exc:  # validated at upload: the store's copy is damaged
                raise ApiError(f"the stored inferlet {record.name!r} cannot be loaded: {exc}", 500) from None
            self.remember_program(record, program_hash)
        return program_hash

    async def launch(self, program_hash: str, arguments: list[str], tenant: str,
                     limits: InstanceLimits | None = None) -> InstanceHandle:
        """An instance of a loaded program for tenant. 429 (too_many_instances) over the tenant's quota of
        instances; the runtime's LimitError (limits above the server's maxima) passes through. A program whose
        compiled code the runtime evicted meanwhile (engine/runtime/programs.py) is loaded again first."""
        view, _ = self.ready()
        try:
            try:
                return view.launch(program_hash, arguments, tenant, limits)
            except KeyError:
                await self._load_again(view, program_hash)
                return view.launch(program_hash, arguments, tenant, limits)
        except TenantQuotaError as exc:
            raise ApiError(str(exc), 429, code="too_many_instances") from None

    async def _load_again(self, view: EngineView, program_hash: str) -> None:
        record = self._program_sources.get(program_hash)
        if record is None:
            raise ApiError(f"the program {program_hash} is not loaded", 500)
        try:
            wasm = await asyncio.to_thread(self.inferlets.wasm, record)
        except FileNotFoundError:  # deleted meanwhile
            raise ApiError(f"no inferlet {record.name!r}", 404, code="inferlet_not_found") from None
        await asyncio.to_thread(view.load_program, wasm)

    async def program_hash_for_model(self, model: str, request: Any) -> str | None:
        """None for the served model (the default inferlet); the named inferlet's for "inferlet:NAME"."""
        if not model.startswith(INFERLET_MODEL_PREFIX):
            return None
        try:
            record = await self.find_inferlet(model[len(INFERLET_MODEL_PREFIX):], self.tenant_of(request))
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise ApiError(f"The model `{model}` does not exist: no inferlet of that name was uploaded or is built "
                           "in.", 404, param="model", code="model_not_found") from None
        return await self.program_hash_of(record)

    # inferlets by name, as a tenant sees them -----------------------------------------------------
    async def find_inferlet(self, ref: str, tenant: str) -> InferletRecord:
        """By name or id: the tenant's own upload, else a preinstalled contrib inferlet (built now if it is not
        yet), else another built-in one. ApiError: 404 (inferlet_not_found), 500 if the build fails."""
        own = self.inferlets.find(ref, tenant)
        if own is not None:
            return own
        if ref in self.preinstalled.names:
            try:
                return await self.preinstalled.ensure(ref)
            except (BuildError, OSError) as exc:
                raise ApiError(f"the preinstalled inferlet {ref!r} could not be built: {exc}", 500) from None
        try:
            return self.inferlets.get(ref, tenant)
        except StoreError as exc:
            raise ApiError(str(exc), exc.status, code="inferlet_not_found") from None

    def has_inferlet(self, ref: str, tenant: str) -> bool:
        """Whether ref names one for tenant (without building anything)."""
        if ref in self.preinstalled.names:
            return True
        try:
            self.inferlets.get(ref, tenant)
        except StoreError:
            return False
        return True

    async def describe_inferlet(self, ref: str, tenant: str) -> dict[str, Any]:
        """GET /v1/inferlets/{ref}: a preinstalled one not built yet is described by its status (not built)."""
        if ref in self.preinstalled.names and self.inferlets.find(ref, tenant) is None:
            await self.preinstalled.adopt_built([ref])
            return self.preinstalled.entry(ref)
        return (await self.find_inferlet(ref, tenant)).public()

    async def list_inferlets(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's uploads and the built-in inferlets it does not shadow: the store's (whose records of
        preinstalled names may be an earlier start's builds: left out), then the preinstalled ones by name."""
        await self.preinstalled.adopt_built()
        records = self.inferlets.list(tenant)
        own_names = {r.name for r in records if r.tenant == tenant}
        listed = [r.public() for r in records if r.tenant == tenant or r.name not in self.preinstalled.names]
        return listed + [self.preinstalled.entry(name) for name in sorted(self.preinstalled.names - own_names)]

    def delete_inferlet(self, ref: str, tenant: str) -> list[InferletRecord]:
        """The tenant's own (StoreError: 404 unknown, 403 built in, preinstalled ones built or not)."""
        if ref in self.preinstalled.names and self.inferlets.find(ref, tenant) is None:
            raise StoreError(f"{ref!r} is a built-in inferlet: it cannot be deleted", 403)
        return self.inferlets.delete(ref, tenant)

    def ready(self) -> tuple[EngineView, ModelLimits]:
        if self.status == "loading":
            raise ApiError("the model is still loading", 503)
        if self.view is None or self.limits is None or self.status != "ready":
            raise ApiError(f"the engine is not available: {self.error or self.status}", 503)
        if not self.view.alive():
            raise ApiError("the engine has stopped", 503)
        return self.view, self.limits

    @contextlib.asynccontextmanager
    async def run(self, arguments: str, program_hash: str | None = None,
                  tenant: str | None = None) -> AsyncIterator[InferletRun]:
        """Launch the default inferlet (or program_hash) for tenant (None: the default tenant) once a slot is
        free; it is killed (pages freed) on the way out unless it already ended, e.g. when the client went away
        (this task is then cancelled)."""
        self.ready()
        assert self._slots is not None
        self.num_queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.num_queued -= 1
        try:
            launch_started = time.monotonic()
            handle = await self.launch(program_hash or self.program_hash, [arguments], tenant or self.config.tenant)
            source = self._program_sources.get(program_hash) if program_hash else None
            run = InferletRun(handle, source.name if source else DEFAULT_INFERLET_NAME)
            run.trace.marks["slot"] = launch_started
            if self.trace_writer is not None:
                handle.trace_into(run.trace.marks)  # the runtime's marks (submitted, received) join the app's
            run.trace.in_flight = self.num_in_flight
            run.trace.mark("launched")
            self.num_running += 1
            try:
                yield run
            finally:
                self.num_running -= 1
                run.kill()
        finally:
            self._slots.release()

    async def enter_run(self, stack: contextlib.AsyncExitStack, arguments: str, n: int,
                        program_hash: str | None = None, tenant: str | None = None) -> tuple[InferletRun, PromptInfo]:
        """Launch into stack (which then owns the instance and its page reservation), wait for the prompt
        event, reserve the pages the request may need (queueing while the KV cache is committed), go."""
        run = await stack.enter_async_context(self.run(arguments, program_hash, tenant))
        prompt = await run.start()
        run.trace.mark("prompt")
        assert self.view is not None and self.admission is not None
        view, admission = self.view, self.admission
        num_pages = pages_for(prompt.prompt_tokens, prompt.max_tokens, n, view.page_size,
                              self.config.max_output_reserve, admission.num_pages)
        self.num_queued += 1
        reserved = admission.reserve(num_pages)
        try:
            await asyncio.wrap_future(reserved)
        except BaseException as exc:
            if not reserved.cancel() and reserved.exception() is None:  # granted meanwhile: give the pages back
                admission.release(num_pages)
            if isinstance(exc, Exception) and not view.alive():  # the engine died while the request waited
                raise ApiError("the engine has stopped", 503) from None
            raise
        finally:
            self.num_queued -= 1
        stack.callback(admission.release, num_pages)
        run.trace.mark("admitted")
        run.proceed()
        return run, prompt

    def gauges(self) -> EngineGauges:
        if self.view is None:
            return EngineGauges(num_requests_waiting=self.num_queued)
        return self.view.gauges(self.num_running, self.num_queued)


def _close_late_view(loading: concurrent.futures.Future[EngineView]) -> None:
    if loading.exception() is None:
        loading.result().close()

"""The control layer (engine/control/api.py's Control) over one executor: the API and the lock.

One job: the facade the runtime calls (instances, pages, prefix cache, forwards, decodes, stats). The
bookkeeping is ControlState's (state.py); running steps, StepLoop's (step_loop.py: forming a step and
delivering its results is StepBuilder's, scheduling.py). The Controller owns all three.

Threading: every public method may be called from any thread; state is guarded by one lock, taken through
StepLoop.locked(), which wakes the loop and settles futures after the lock is released (their callbacks may
call back in). The executor runs one step at a time, WITHOUT the lock: `start()` runs steps on a thread of
its own whenever there is work; tests may call `step()` instead.

Out of pages: allocations wait in a queue of page demands (together with preempted instances waiting to
swap back in), served oldest instance first and FIFO per instance (see DemandQueue). When the head demand
cannot be met and nothing can run, the newest instance newer than the head's with exclusively owned pages
is preempted: its pages go to host swap slots in the next batch and its work pauses until pages are free
to bring them back (to any pages: its blocks are remapped). When no swap slot is left, the demand waits
while some instance holding pages is not itself waiting for pages (it may still free them); only in that
deadlock is a victim evicted instead (the last resort: its pages are dropped, its pending futures get a
ControlError starting with KV_EVICTED, and so does a later call naming one of its old page ids; the instance
lives on, and pie_sdk's Context computes the lost KV again from its tokens); with no newer victim, the head's
own instance is. A demand fails only in such a deadlock when its instance holds no page of its own, or when it
asks for more pages than the pool has.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Sequence

from pie_server.engine.config import EngineInfo
from pie_server.engine.control.admission import Admission
from pie_server.engine.control.api import ControlError, ControlStats, InstanceClosed, VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.decoding import DecodeRequest, DecodeStream, extend_room
from pie_server.engine.control.instance import Allocation, InstanceState
from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.resources import Resources
from pie_server.engine.control.state import ControlState
from pie_server.engine.control.step_loop import Executor, StepLoop
from pie_server.engine.control.swap import nonresident_blocks
from pie_server.engine.control.work import Limits, check_copy, first_item, prepare_forward, queued_page_ids
from pie_server.engine.grammar import GrammarError, GrammarMatcher, GrammarSpec, LazyCompiler
from pie_server.engine.step import CommandResult
from pie_server.engine.types import InstanceId, TokenId, VirtualPageId


class Controller:
    def __init__(self, executor: Executor, config: ControlConfig | None = None,
                 grammars: LazyCompiler | None = None) -> None:
        """grammars: the compiler of decodes under a grammar (DecodeRequest.grammar); without it they are refused."""
        self.config = config = config or ControlConfig()
        self._grammars = grammars
        self.can_decode_grammar = grammars is not None
        self.info: EngineInfo = executor.info
        model = getattr(executor, "model_config", None)
        limits = Limits(
            page_size=self.info.page_size, max_context_len=self.info.max_context_len,
            vocab_size=config.vocab_size or getattr(model, "vocab_size", None),
            max_position=config.max_position or getattr(model, "max_position_embeddings", None))
        self.admission = Admission.for_pool(self.info.num_pages)  # for the default path; its own lock
        # Guarded by _lock: read it from outside only for inspection (tests, stats).
        self.state = ControlState(config, Resources(self.info.num_pages, self.info.page_size,
                                                    executor.num_swap_slots), limits)
        self._lock = threading.Lock()
        self._loop = StepLoop(self.state, executor, config, self._lock)
        # `with self._locked():` holds the lock; on exit, wakes the loop (if mutating: the call may have
        # created work) and settles the futures the call resolved, after releasing the lock. Bound once:
        # no extra call per API call.
        self._locked = self._loop.locked
        self._num_instances_opened = 0

    # -- instances ----------------------------------------------------------------------------------------
    def open_instance(self, instance_id: InstanceId, max_pages: int | None = None) -> None:
        with self._locked(mutating=False):
            if instance_id in self.state.instances:
                raise ControlError(f"instance {instance_id!r} is already open")
            table = PageTable(self.info.page_size, self.config.default_max_pages if max_pages is None
                              else max_pages)
            self._num_instances_opened += 1
            self.state.instances[instance_id] = InstanceState(instance_id, self._num_instances_opened, table)

    def close_instance(self, instance_id: InstanceId) -> None:
        with self._locked():
            instance = self.state.instances.pop(instance_id, None)
            if instance is None:
                raise ControlError(f"unknown instance {instance_id!r}")
            self.state.drop_instance(instance, InstanceClosed(f"instance {instance_id!r} was closed"))
            instance.closed = True
            self._loop.forget(instance)
            self.state.serve_demands()

    # -- pages --------------------------------------------------------------------------------------------
    def allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Future[list[VirtualPageId]]:
        future: Future[list[VirtualPageId]] = Future()
        with self._locked():
            instance = self.state.get(instance_id)
            _check_num_pages(num_pages)
            num_held = len(instance.table.block_counts()) + instance.num_pages_requested
            if num_held + num_pages > self.info.num_pages:  # it could never run: all must be resident
                raise ControlError(f"cannot allocate {num_pages} pages: the instance would hold "
                                   f"{num_held + num_pages}, the pool has {self.info.num_pages}")
            instance.table.check_quota(num_pages, instance.num_pages_requested)
            instance.num_pages_requested += num_pages
            self.state.demands.push(Allocation(instance, num_pages, future))
            self.state.serve_demands()
        return future

    def try_allocate_pages(self, instance_id: InstanceId, num_pages: int) -> list[VirtualPageId]:
        """num_pages now if they are free (after evicting cache-only pages) and no demand waits; else none. Never
        a demand, so never a preemption: for pages wanted ahead of need (a running decode's next room)."""
        with self._locked():
            instance = self.state.get(instance_id)
            _check_num_pages(num_pages)
            instance.table.check_quota(num_pages, instance.num_pages_requested)
            if len(self.state.demands) or not self.state.res.make_free(num_pages):
                return []
            return instance.table.add(self.state.res.pool.allocate(num_pages))

    def free_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> None:
        with self._locked():
            instance = self.state.get(instance_id)
            in_use = queued_page_ids(instance.queue) if instance.queue else frozenset()
            self.state.res.drop(instance.table.remove(list(page_ids), in_use))
            self.state.serve_demands()

    def copy_slots(self, instance_id: InstanceId, src_page_id: VirtualPageId, dst_page_id: VirtualPageId,
                   src_offset: int, dst_offset: int, num_slots: int) -> None:
        with self._locked():
            instance = self.state.get(instance_id)
            item = check_copy(instance.table, src_page_id, dst_page_id, src_offset, dst_offset, num_slots)
            self.state.check_writable(item.written_ids, [item.dst_block_id])
            self.state.enqueue(instance, item)

    def mask_slots(self, instance_id: InstanceId, page_id: VirtualPageId, slot_mask: Sequence[bool]) -> None:
        with self._locked(mutating=False):
            self.state.get(instance_id).table.set_visibility(page_id, slot_mask)

    def share_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> list[VirtualPageId]:
        with self._locked(mutating=False):
            instance = self.state.get(instance_id)
            table, page_ids = instance.table, list(page_ids)
            block_ids = table.blocks(page_ids, distinct=True)
            table.check_quota(len(block_ids))
            self.state.check_not_being_written(instance, page_ids)
            new_ids = self.state.res.share_into(table, block_ids)
            table.copy_visibility(page_ids, new_ids)
            return new_ids

    def export_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId], name: str) -> None:
        with self._locked(mutating=False):
            instance = self.state.get(instance_id)
            self.state.check_not_being_written(instance, page_ids)
            self.state.res.export(instance.table, list(page_ids), name)

    def import_pages(self, instance_id: InstanceId, name: str) -> list[VirtualPageId]:
        with self._locked(mutating=False):
            return self.state.res.import_(self.state.get(instance_id).table, name)

    def unexport_pages(self, name: str) -> None:
        with self._locked():
            self.state.res.unexport(name)
            self.state.serve_demands()

    def list_exports(self) -> list[str]:
        with self._locked(mutating=False):
            return sorted(self.state.res.exports)

    def page_usage(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId] | None
                   ) -> tuple[int, int, int]:
        """(ids, distinct blocks they name, blocks among those with refcount > 1: read-only). None: every
        page the instance holds (ids freed while a queued command still uses them included)."""
        with self._locked(mutating=False):
            table = self.state.get(instance_id).table
            block_ids = [b for _, b in table.items()] if page_ids is None else table.blocks(list(page_ids))
            distinct = set(block_ids)
            pool = self.state.res.pool
            return len(block_ids), len(distinct), sum(1 for b in distinct if pool.refcount(b) > 1)

    # -- prefix cache -------------------------------------------------------------------------------------
    def prefix_lookup(self, instance_id: InstanceId, token_ids: Sequence[TokenId]
                      ) -> tuple[list[VirtualPageId], int]:
        """The hit may cover all of token_ids; to get logits, look up token_ids[:-1] (or recompute a token)."""
        with self._locked(mutating=False):
            return self.state.res.prefix_lookup(self.state.get(instance_id).table, list(token_ids))

    def prefix_publish(self, instance_id: InstanceId, token_ids: Sequence[TokenId],
                       page_ids: Sequence[VirtualPageId]) -> None:
        with self._locked(mutating=False):
            instance = self.state.get(instance_id)
            self.state.check_not_being_written(instance, page_ids)
            self.state.res.prefix_publish(instance.table, list(token_ids), list(page_ids))

    def clear_prefix_cache(self) -> None:
        """Drops the cache's references (pages held by nobody else go free)."""
        with self._locked():
            self.state.res.clear_prefix_cache()
            self.state.serve_demands()

    @property
    def num_cached_pages(self) -> int:
        with self._lock:
            return self.state.res.cache.num_blocks

    # -- forwards -----------------------------------------------------------------------------------------
    def forward(self, instance_id: InstanceId, command: VirtualForward) -> Future[CommandResult]:
        if not isinstance(command, VirtualForward):
            raise ControlError(f"forward takes a VirtualForward, got {type(command).__name__}")
        future: Future[CommandResult] = Future()
        with self._locked():
            instance = self.state.get(instance_id)
            item = prepare_forward(command, instance.table, self.state.limits, future)
            self.state.check_writable(item.written_ids, item.written_block_ids)
            self._loop.enqueue(instance, item)
        return future

    def decode(self, instance_id: InstanceId, request: DecodeRequest,
               stream: DecodeStream | None = None) -> DecodeStream:
        """Decodes until a stop token, max_new_tokens, the context limit, the end of the pages' room, or
        stop_decode (engine/control/decoding.py); the first forward is validated like forward()'s. stream:
        where the outputs go (the engine core relays them to its front ends); default a new DecodeStream."""
        stream = DecodeStream() if stream is None else stream
        grammar = None if request.grammar is None else self._matcher(request.grammar)  # unlocked: may compile
        with self._locked():
            instance = self.state.get(instance_id)
            item = first_item(request, stream, instance.table, self.state.limits, grammar)
            self.state.check_writable(item.written_ids, item.written_block_ids)
            self._loop.enqueue(instance, item)
        return stream

    def _matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        if self._grammars is None:
            raise ControlError("this control layer was given no grammar compiler: it cannot decode under a grammar")
        try:
            return self._grammars.get().matcher(spec)
        except GrammarError as error:
            raise ControlError(str(error)) from None

    def extend_decode(self, instance_id: InstanceId, stream: DecodeStream, page_ids: Sequence[VirtualPageId],
                      num_pages_before: int) -> None:
        """More room for a running decode that holds num_pages_before pages: page_ids (the instance's, allocated
        by the caller) follow them, so it goes on past its old room. A decode that ended, ends at its old room
        before this reaches it, or holds another count (an extension was lost), ends as before: its caller then
        decodes again with all the pages."""
        with self._locked():
            table = self.state.get(instance_id).table
            if stream.room is None:
                raise ControlError("extend_decode takes the stream of a decode this control layer runs")
            known = set(stream.room)
            for page_id in page_ids:
                if table.get_block(page_id) is None:
                    raise ControlError(f"page {page_id} is not instance {instance_id!r}'s")
                if page_id in known:
                    raise ControlError(f"page {page_id} is already in the decode's pages")
                known.add(page_id)
            extend_room(stream, page_ids, num_pages_before)

    def stop_decode(self, instance_id: InstanceId, stream: DecodeStream) -> None:
        """Ends the decode: at once if its next forward is only queued, else when the running one returns."""
        with self._locked():
            instance = self.state.instances.get(instance_id)
            stream.stop_requested = True
            if instance is not None:
                self.state.stop_queued_decode(instance, stream)

    def stats(self) -> ControlStats:
        """num_free_pages counts free pages plus cached pages that only the prefix cache holds (an
        allocation evicts those on demand)."""
        with self._lock:
            pool, cache = self.state.res.pool, self.state.res.cache
            swapped = {id(i) for i in self.state.instances.values() if nonresident_blocks(i, pool)}
            running = {id(chunk.instance) for chunk in self.state.inflight_chunks()}
            running.update(id(i) for i in self.state.active if id(i) not in swapped and i.num_queued_forwards)
            return ControlStats(
                num_pages=self.info.num_pages, num_free_pages=self.state.res.num_available_pages(),
                num_instances=len(self.state.instances), num_running=len(running),
                num_waiting=len(self.state.demands.waiting_instances()), num_swapped=len(swapped),
                num_prefix_queries=cache.num_queries, num_prefix_hit_tokens=cache.num_hit_tokens,
                num_prefix_query_tokens=cache.num_query_tokens, num_evictions=self.state.num_evictions)

    # -- stepping (the loop's: step_loop.py) ---------------------------------------------------------------
    def add_step_listener(self, listener: Callable[[], None]) -> None:
        """listener() runs on the stepping thread after each step that ran, once its futures are settled
        and its outputs pushed (the engine core sends them to the front ends then)."""
        self._loop.add_listener(listener)

    def step(self) -> bool:
        """Forms and runs one batch (pipelined: submits one and delivers the one before); False when there
        was nothing to do."""
        return self._loop.step()

    def start(self) -> None:
        """Runs steps on a background thread until stop()."""
        self._loop.start()

    @property
    def is_running(self) -> bool:
        """The run thread is alive (start() was called and neither stop() nor a crash ended it)."""
        return self._loop.is_running

    def stop(self) -> None:
        self._loop.stop()


def _check_num_pages(num_pages: object) -> None:
    if not isinstance(num_pages, int) or num_pages < 0:
        raise ControlError(f"num_pages must be a non-negative int, got {num_pages!r}")

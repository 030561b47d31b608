"""What the control layer knows, and the operations that keep it consistent: instances, their queued work, the
page demands waiting for pages, the running step's chunks, and the futures to settle.

One job: the bookkeeping. The Controller (controller.py) owns one ControlState, guards it with its lock and
exposes the Control API; the StepBuilder (scheduling.py) forms steps from it and delivers results into it.
Neither reaches into the other. Everything here runs with the Controller's lock held; futures are only queued
(`outbox`) and settled by the Controller after the lock is released, since their callbacks may call back in.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pie_server.engine.control.api import KV_EVICTED, ControlError
from pie_server.engine.control.batcher import Chunk
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.decoding import END_CANCELLED, DecodeStream, Decoding
from pie_server.engine.control.instance import Allocation, Demand, DemandQueue, InstanceState
from pie_server.engine.control.pages import BlockId
from pie_server.engine.control.resources import Resources
from pie_server.engine.control.swap import nonresident_blocks
from pie_server.engine.control.work import CopyItem, ForwardItem, Limits, next_item, queued_page_ids
from pie_server.engine.grammar import fill_masks
from pie_server.engine.step import OutputResult, TokenRef
from pie_server.engine.types import InstanceId, VirtualPageId

# Brings an instance's swapped-out blocks back in the step being formed (StepBuilder.swap_in).
SwapInFn = Callable[[InstanceState, list[BlockId]], None]
# Per forward command of a step: its chunk and the output indices it carries (None: all, in order).
Sources = list[tuple[Chunk, list[int] | None]]


@dataclass
class RunningStep:
    sources: Sources
    moved: list[InstanceState]  # instances whose KV the step swaps or copies
    # Some forward's next one waits for this step's delivery (awaits_delivery below): the loop then delivers it as
    # early as one step ahead allows. Computed only with speculation_depth > 1, the one place it is read.
    awaits_delivery: bool = False


def awaits_delivery(chunk: Chunk) -> bool:
    """Whether the chunk's next forward waits for its step's delivery: an API forward (its caller answers) or a
    decode that follows tokens (its next mask or penalties, decoding.py): nothing of it continues on the device."""
    decoding = chunk.item.decoding
    return decoding is None or decoding.follows_tokens


class ControlState:
    def __init__(self, config: ControlConfig, resources: Resources, limits: Limits) -> None:
        self.config = config
        self.res = resources
        self.limits = limits
        self.instances: dict[InstanceId, InstanceState] = {}
        self.active: dict[InstanceState, None] = {}  # instances with queued work, oldest first
        # TokenRef(i) at index i: a TokenRef is immutable, so one per command index serves every step (building
        # one per speculated forward cost about as much as the rest of its bookkeeping).
        self._token_refs: list[TokenRef] = []
        self.demands = DemandQueue()
        # The steps submitted and not yet delivered, oldest first: one, or two when steps are pipelined.
        self.running: deque[RunningStep] = deque()
        self.step_id = 0
        self.num_evictions = 0
        self.outbox: list[tuple[Future[Any], Any, BaseException | None]] = []
        # Grammar decodes whose token a delivery took: (instance, the forward that sampled it, the token).
        self.masks_due: list[tuple[InstanceState, ForwardItem, int]] = []

    def inflight_chunks(self) -> Iterator[Chunk]:
        for step in self.running:
            for chunk, _ in step.sources:
                yield chunk

    def get(self, instance_id: InstanceId) -> InstanceState:
        """The open, healthy instance; ControlError otherwise."""
        instance = self.instances.get(instance_id)
        if instance is None:
            raise ControlError(f"unknown instance {instance_id!r}")
        if instance.failure is not None:
            raise ControlError(instance.failure)
        return instance

    def settle(self, future: Future[Any], value: Any = None, error: BaseException | None = None) -> None:
        self.outbox.append((future, value, error))

    def take_outbox(self) -> list[tuple[Future[Any], Any, BaseException | None]]:
        outbox, self.outbox = self.outbox, []
        return outbox

    # -- queued work --------------------------------------------------------------------------------------
    def enqueue(self, instance: InstanceState, item: ForwardItem | CopyItem) -> None:
        instance.queue.append(item)
        if instance not in self.active:
            self.active[instance] = None

    def unqueue(self, instance: InstanceState, item: ForwardItem | CopyItem | None = None) -> None:
        """Takes item (by default the head) off the instance's queue; pages freed while it was queued go now."""
        if item is None or instance.queue[0] is item:
            instance.queue.popleft()
        else:
            instance.queue.remove(item)
        if instance.table.has_retired:
            self.res.drop(instance.table.release_retired(queued_page_ids(instance.queue)))

    def withdraw(self, instance: InstanceState, item: ForwardItem | CopyItem) -> None:
        """Takes an item that will not run off the queue; an instance left without work leaves the active set."""
        self.unqueue(instance, item)
        if not instance.queue:
            self.active.pop(instance, None)

    def token_refs(self, num_commands: int) -> list[TokenRef]:
        """A list whose item i is TokenRef(i), for i < num_commands at least (grown on demand)."""
        refs = self._token_refs
        while len(refs) < num_commands:
            refs.append(TokenRef(len(refs)))
        return refs

    def check_writable(self, page_ids: Sequence[VirtualPageId], block_ids: Sequence[BlockId]) -> None:
        """The sharing invariant: pages with more than one reference are read-only."""
        index = self.res.pool.first_shared(block_ids)
        if index >= 0:
            refcount = self.res.pool.refcount(block_ids[index])
            raise ControlError(f"page {page_ids[index]} is shared ({refcount} references) and so read-only; copy "
                               "its slots to a private page before writing")

    @staticmethod
    def check_not_being_written(instance: InstanceState, page_ids: Sequence[VirtualPageId]) -> None:
        """Sharing a page a queued command will write would break the sharing invariant for that command."""
        if instance.queue:
            written = queued_page_ids(instance.queue, written=True)
            for page_id in page_ids:
                if page_id in written:
                    raise ControlError(f"page {page_id} is being written by a queued forward or copy; wait "
                                       "for it before sharing the page")

    def cancel(self, item: Any, error: ControlError) -> None:
        if isinstance(item, ForwardItem) and not item.cancelled:
            item.cancelled = True
            self.settle(item.future, error=error)

    def drop_instance(self, instance: InstanceState, error: ControlError, evicted: bool = False) -> None:
        """Fails all of the instance's pending work with error and drops all its page references (evicted: later
        uses of its page ids say KV_EVICTED)."""
        for item in instance.queue:
            self.cancel(item, error)
        instance.queue.clear()
        for chunk in self.inflight_chunks():
            if chunk.instance is instance:
                self.cancel(chunk.item, error)
        for demand in self.demands.remove_instance(instance):
            if isinstance(demand, Allocation):
                self.settle(demand.future, error=error)
        instance.num_pages_requested = 0
        instance.swap_in_queued = False
        self.active.pop(instance, None)
        self.res.drop(instance.table.evict_all() if evicted else instance.table.remove_all())

    def fail_instance(self, instance: InstanceState, reason: str) -> None:
        """Lost KV: every pending and later call of the instance fails."""
        instance.failure = reason
        self.drop_instance(instance, ControlError(reason))

    def evict_instance(self, instance: InstanceState) -> None:
        """The last resort of preemption: the instance's pages are dropped and its pending work fails with
        KV_EVICTED; the instance lives on (its owner may compute the KV again in new pages)."""
        self.num_evictions += 1
        self.drop_instance(instance, ControlError(
            f"{KV_EVICTED}: instance {instance.instance_id!r} was preempted with no host swap space left, and its "
            "pages were dropped (the last resort; compute them again)"), evicted=True)

    def stop_queued_decode(self, instance: InstanceState, stream: DecodeStream) -> None:
        """Takes the decode's forward off the queue if no part of it was scheduled; the decode ends now, or,
        when a forward of it still runs (pipelined steps), when that one comes back."""
        for item in instance.queue:
            if isinstance(item, ForwardItem) and item.decoding is not None and item.decoding.stream is stream \
                    and item.num_scheduled == 0 and not item.cancelled:
                self.withdraw(instance, item)
                decoding = item.decoding
                if item in decoding.speculated:  # queued behind a running one (speculated ahead of it)
                    decoding.speculated.remove(item)
                if decoding.num_in_flight == 0:
                    self.settle(stream.done, END_CANCELLED)
                return

    def continue_decode(self, instance: InstanceState, item: ForwardItem, output: OutputResult) -> None:
        """A decode's forward came back with its sampled output: stream it, then queue the next forward or end.
        With pipelined steps its next forward may be queued or running already (speculated, fed the token on
        the device): it goes on, or is withdrawn (queued) or its output dropped (running) if decoding ends."""
        decoding = item.decoding
        assert decoding is not None
        if item.wasted:  # speculated past the decode's end: only the end is left to say
            if decoding.num_in_flight == 0:
                self.settle(decoding.stream.done, decoding.end_reason or END_CANCELLED)
            return
        waiter, end = decoding.accept(output, item.positions[-1] + 1, item.context_len, self.limits.page_size,
                                      self.limits.max_context_len)
        if waiter is not None:
            self.settle(waiter)
        speculated = decoding.speculated
        if end is not None or instance.closed or instance.failure is not None:
            decoding.speculated = []
            self._end_decode(instance, decoding, speculated, end or END_CANCELLED)
            return
        successor = speculated.pop(0) if speculated else None  # the forward this output feeds
        if successor is not None:
            successor.token_ids[-1] = output.token_id
            if successor.num_scheduled == 0:  # still queued: it takes the token from the host after all
                successor.fed = None
        elif decoding.grammar is not None:
            self.masks_due.append((instance, item, output.token_id))  # continue_grammar_decodes goes on
        else:
            self._continue(instance, item, output.token_id)

    def continue_grammar_decodes(self) -> None:
        """Queues the next forwards of the grammar decodes that continue_decode took tokens of (since the last
        call), their masks computed together: in parallel threads when there are many (engine/grammar.py)."""
        due, self.masks_due = self.masks_due, []
        if not due:
            return
        for (instance, item, token_id), mask in zip(due, fill_masks([i.decoding.grammar for _, i, _ in due])):
            item.decoding.next_mask = mask  # type: ignore[union-attr]
            self._continue(instance, item, token_id)

    def _continue(self, instance: InstanceState, item: ForwardItem, token_id: int) -> None:
        try:
            self.enqueue(instance, next_item(item, token_id, instance.table, self.limits))
        except ControlError as error:  # a page of the decode was freed meanwhile, or its grammar allows nothing
            self.settle(item.decoding.stream.done, error=error)  # type: ignore[union-attr]

    def _end_decode(self, instance: InstanceState, decoding: Decoding, successors: list[ForwardItem],
                    reason: str) -> None:
        """successors: the decode's forwards speculated past this output, oldest first."""
        running = False
        for successor in successors:
            if successor.num_scheduled == 0:
                self.withdraw(instance, successor)
            else:
                successor.wasted = True  # it runs; the end is said when the last comes back
                running = True
        if running:
            decoding.end_reason = reason
            return
        if decoding.failure is not None:  # a grammar decode (never speculated, so no successor) whose grammar broke
            self.settle(decoding.stream.done, error=decoding.failure)
        else:
            self.settle(decoding.stream.done, reason)

    # -- admission ----------------------------------------------------------------------------------------
    def fair_share(self) -> int:
        """Pages of the pool per contender: per open instance that maps pages or waits for some (at least 1)."""
        waiting = self.demands.waiting_instances()
        num_contenders = sum(1 for i in self.instances.values() if i.failure is None and (
            i.table.num_pages or i.table.has_retired or id(i) in waiting))
        return max(1, self.res.pool.num_pages // max(1, num_contenders))

    def head_demand(self) -> Demand:
        """The demand to meet next: the queue's head (oldest instance first), unless that instance already holds
        more than its fair share; then the first demand of an instance within its share, if one waits. So the
        demands of an instance that took the pool wait behind those of the instances it starves."""
        head = self.demands.head
        if not self.demands.has_others(head.instance):
            return head
        share = self.fair_share()
        for demand in self.demands:
            if _holds_at_most(demand.instance, share):
                return demand
        return head

    @staticmethod
    def num_pages_held(demand: Demand) -> int:
        """Distinct pages the demand's instance holds once it is met (wherever they live)."""
        return len(demand.instance.table.block_counts()) + demand.num_new_pages

    def num_pages_wanted(self, demand: Demand) -> int:
        """Free pages the demand needs: its new pages and its instance's swapped-out blocks."""
        return demand.num_new_pages + len(nonresident_blocks(demand.instance, self.res.pool))

    def serve_demands(self, swap_in: SwapInFn | None = None) -> None:
        """Meets waiting demands in order (head_demand) while pages allow. A demand of an instance with
        swapped-out blocks brings them back first, which only a step being formed (swap_in) can do."""
        while self.demands:
            demand = self.head_demand()
            instance = demand.instance
            if isinstance(demand, Allocation) and demand.future.cancelled():
                self.demands.remove(demand)
                instance.num_pages_requested -= demand.num_pages
                continue
            num_new = demand.num_new_pages
            missing = nonresident_blocks(instance, self.res.pool)
            if missing and swap_in is None:
                return
            if not self.res.make_free(len(missing) + num_new):
                return
            self.demands.remove(demand)
            if missing:
                swap_in(instance, missing)  # type: ignore[misc]
            if isinstance(demand, Allocation):
                instance.num_pages_requested -= demand.num_pages
                self.settle(demand.future, instance.table.add(self.res.pool.allocate(num_new)))
            else:
                instance.swap_in_queued = False


def _holds_at_most(instance: InstanceState, num_pages: int) -> bool:
    """The instance's table names at most num_pages distinct blocks (virtual ids bound them: cheap first)."""
    table = instance.table
    if table.num_pages <= num_pages and not table.has_retired:
        return True
    return len(table.block_counts()) <= num_pages

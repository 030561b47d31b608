"""Forming one step from the control state (state.py), and taking its results back. Runs under the controller's lock.

Forming a step, in order:
1. admission: meet page demands (allocations, swap-ins) FIFO; while the head demand cannot be met and no
   instance can run, preempt (swap out a victim; without a swap slot, and only when every instance holding
   pages waits for pages, evict it: its KV is dropped, the last resort) or, in a true deadlock, fail the head
   demand;
2. batching: plan_step picks the copies and forward chunks of the runnable instances;
3. translation: virtual pages -> blocks -> physical pages, at this moment (blocks may have moved since the
   command was queued). The batch carries this round's swap-outs and swap-ins, which run before its copies
   and forwards.
"""
from __future__ import annotations

from pie_server.engine.control.api import ControlError
from pie_server.engine.control.batcher import Chunk, StepPlan, plan_step
from pie_server.engine.control.instance import Allocation, Demand, InstanceState, SwapIn
from pie_server.engine.control.pages import BlockId
from pie_server.engine.control.state import ControlState, RunningStep, Sources, awaits_delivery
from pie_server.engine.control.work import next_item
from pie_server.engine.control.swap import choose_hoarder, choose_victim, nonresident_blocks, swappable_blocks
from pie_server.engine.step import Batch, CommandResult, ForwardCommand, PageCopy, PageSwap, StepResult

PLACEHOLDER_TOKEN = 0  # a speculated decode forward's token until the device feeds (or the host patches) it


class StepBuilder:
    """One step's forming, or one step's results: built for each and dropped after (its lists are that step's)."""

    def __init__(self, state: ControlState) -> None:
        self.s = state
        self.pool = state.res.pool
        self.swap_outs: list[PageSwap] = []
        self.swap_ins: list[PageSwap] = []
        self.swapped_in: set[BlockId] = set()
        self.moved: list[InstanceState] = []  # instances whose KV this batch swaps or copies

    # -- forming ------------------------------------------------------------------------------------------
    def form(self, speculate: bool = False) -> Batch | None:
        """The next step (appended to state.running), or None when there is nothing to do. speculate: the
        step is submitted before the newest running one is delivered (pipelined), so the decodes running
        there queue their next forward now, fed on the device with the token that step samples."""
        direct = self._speculate(self.s.running[-1]) if speculate and self.s.running else []
        plan = plan_step(self._admit(), self.s.config, num_reserved=len(direct))
        copies, forwards, sources = self._apply(plan, direct)
        self.pool.end_batch()
        if not (forwards or copies or self.swap_outs or self.swap_ins):
            return None
        self.s.step_id += 1
        awaits = self.s.config.speculation_depth > 1 and any(awaits_delivery(chunk) for chunk, _ in sources)
        self.s.running.append(RunningStep(sources, self.moved, awaits))
        return Batch(forwards=forwards, page_copies=copies, swap_outs=self.swap_outs, swap_ins=self.swap_ins,
                     step_id=self.s.step_id)

    def _speculate(self, running: RunningStep) -> list[Chunk]:
        """Queues the next forward of every decode in running that may go on after it (decoding.py). The hot
        loop of pipelined decoding: one pass, locals, no property or helper call a plain test can replace.
        Returns those that join this step directly (_split_successors); queues the rest."""
        state, limits, pool = self.s, self.s.limits, self.pool
        page_size, max_context_len = limits.page_size, limits.max_context_len
        depth = state.config.speculation_depth
        refs = state.token_refs(len(running.sources))
        successors: list[Chunk] = []
        for command_index, (chunk, _) in enumerate(running.sources):
            item = chunk.item
            decoding = item.decoding
            if decoding is None or chunk.end != item.num_tokens or item.cancelled or item.wasted:
                continue
            speculated = decoding.speculated  # item must be the decode's newest forward, with room for one more
            if speculated and (len(speculated) >= depth or speculated[-1] is not item):
                continue
            instance = chunk.instance
            if instance.closed or instance.failure is not None or not decoding.can_continue_after(
                    item.positions[-1], item.context_len, page_size, max_context_len):
                continue
            try:
                successor = next_item(item, PLACEHOLDER_TOKEN, instance.table, limits)
            except ControlError:
                continue  # a page of the decode was freed: it ends when the running forward returns
            if pool.first_shared(successor.block_ids, successor.write_start) >= 0:
                continue  # a written page got shared (state.check_writable): the same, as for a freed page
            successor.fed = refs[command_index]
            speculated.append(successor)
            successors.append(Chunk(instance, successor, 0, 1))
        direct, queued = self._split_successors(successors)
        enqueue = state.enqueue
        for successor_chunk in queued:
            enqueue(successor_chunk.instance, successor_chunk.item)
        return direct

    def _split_successors(self, successors: list[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
        """(direct, queued): direct join this step without a round through the queues and the planner: the
        successors of instances with nothing else queued and no other successor, when no page demand waits,
        nothing is swapped out, and seats and tokens remain for them and a decode of every other active
        instance. The planner would then have taken them too (it takes decodes first); only an active instance
        with several decodes queued could have had seats before them, and now has them after."""
        state, config = self.s, self.s.config
        num_active = len(state.active)
        if state.demands or self.pool.num_swapped_blocks or not successors \
                or len(successors) + num_active > config.max_batch_size \
                or len(successors) + num_active * config.decode_max_tokens > config.max_batch_tokens:
            return [], successors
        repeated: set[InstanceState] = set()  # instances with two decodes: the planner checks their pages
        if len({successor_chunk.instance for successor_chunk in successors}) < len(successors):
            seen: set[InstanceState] = set()
            for successor_chunk in successors:
                (repeated if successor_chunk.instance in seen else seen).add(successor_chunk.instance)
        direct, queued = [], []
        for successor_chunk in successors:
            instance = successor_chunk.instance
            if instance.queue or instance in repeated or instance.table.has_retired:
                queued.append(successor_chunk)
            else:
                direct.append(successor_chunk)
        return direct, queued

    def swap_in(self, instance: InstanceState, block_ids: list[BlockId]) -> None:
        """Brings the blocks back to the device (the caller has made the pages free)."""
        self.swap_ins.extend(self.pool.swap_in(block_id) for block_id in block_ids)
        self.swapped_in.update(block_ids)
        self.moved.append(instance)

    def _admit(self) -> list[InstanceState]:
        s = self.s
        while True:
            s.serve_demands(self.swap_in)
            runnable = self._runnable()
            if runnable or not s.demands:
                return runnable
            num_demands = len(s.demands)
            s.serve_demands(self.swap_in)  # _runnable may have queued swap-ins that fit now
            if len(s.demands) < num_demands or self._preempt():
                continue
            if not self._deadlocked():
                return runnable  # wait: an instance that is not waiting may still free pages
            self._fail_head()

    def _runnable(self) -> list[InstanceState]:
        """Instances with queued work whose blocks are all resident; the others get a swap-in demand."""
        if self.pool.num_swapped_blocks == 0:  # every block is resident (nonresident_blocks' shortcut, hoisted)
            return list(self.s.active)
        runnable = []
        for instance in self.s.active:
            if not nonresident_blocks(instance, self.pool):
                runnable.append(instance)
            elif not instance.swap_in_queued:
                instance.swap_in_queued = True
                self.s.demands.push(SwapIn(instance))
        return runnable

    def _preempt(self) -> bool:
        """Frees pages for the head demand by preempting a victim: by age (swap.choose_victim), else, for a
        demand within its fair share, pages held beyond theirs (swap.choose_hoarder), else by age for the
        queue's head if head_demand passed it over (as before fair share: no new deadlock); False if none, or
        if the victim cannot be swapped out and some holder of pages is not waiting for pages (then head waits)."""
        head = self.s.head_demand()
        choice = choose_victim(self.s.instances.values(), head.instance, self.pool, self.swapped_in)
        if choice is None and self._preempt_hoarder(head):
            return True
        if choice is None and head is not self.s.demands.head:  # the queue's head was passed over for head
            choice = choose_victim(self.s.instances.values(), self.s.demands.head.instance, self.pool,
                                   self.swapped_in)
        if choice is None:
            return False
        victim, block_ids = choice
        num_slots = self._free_swap_slots(len(block_ids))
        if num_slots > 0:
            self._swap_out(victim, block_ids[:num_slots])
            return True
        if not self._deadlocked():
            return False  # no room to swap, but a holder is still running: its pages may come back; wait
        self.s.evict_instance(victim)  # the last resort: its KV is dropped, the instance lives on
        return True

    def _preempt_hoarder(self, head: Demand) -> bool:
        """Swaps out pages an instance holds beyond its fair share, as many as head lacks, if meeting head keeps
        its own instance within its share (docs/decisions/kv-fair-share.md); the victim is demoted. Never the
        last resort: without a free swap slot the hoarder keeps its pages and head waits."""
        share = self.s.fair_share()
        if self.s.num_pages_held(head) > share:
            return False
        num_wanted = self.s.num_pages_wanted(head) - self.s.res.num_available_pages()
        choice = choose_hoarder(self.s.instances.values(), head.instance, self.pool, share, num_wanted,
                                self.swapped_in)
        if choice is None:
            return False
        victim, block_ids = choice
        num_slots = self._free_swap_slots(len(block_ids))
        if num_slots == 0:
            return False
        self._swap_out(victim, block_ids[:num_slots])
        victim.demote()
        self.s.demands.reorder()
        return True

    def _free_swap_slots(self, num_wanted: int) -> int:
        """How many of num_wanted blocks can be swapped out now (cached pages' slots reclaimed first)."""
        self.s.res.reclaim_swap_slots(num_wanted)
        return min(num_wanted, self.pool.num_free_swap_slots)

    def _swap_out(self, victim: InstanceState, block_ids: list[BlockId]) -> None:
        self.swap_outs.extend(self.pool.swap_out(block_id) for block_id in block_ids)
        self.moved.append(victim)

    def _deadlocked(self) -> bool:
        """True when every instance holding device pages is itself waiting for pages."""
        waiting = self.s.demands.waiting_instances()
        for instance in self.s.instances.values():
            if instance.failure is None and id(instance) not in waiting and any(
                    self.pool.is_resident(block_id) for _, block_id in instance.table.items()):
                return False
        return True

    def _fail_head(self) -> None:
        """A true deadlock: the head demand's own instance is evicted if that frees device pages (the newest
        waiting gives way, as a newer victim would have: its pending work fails with KV_EVICTED); otherwise the
        demand fails."""
        instance = self.s.demands.head.instance
        if swappable_blocks(instance, self.pool):  # device pages it alone holds
            self.s.evict_instance(instance)
            return
        demand = self.s.demands.pop_head()
        reason = (f"out of KV pages: {self.pool.num_free_pages} of {self.pool.num_pages} are free, the rest are "
                  "held by exports or by instances that are all waiting for pages, and none can be preempted")
        if isinstance(demand, Allocation):
            instance.num_pages_requested -= demand.num_pages
            self.s.settle(demand.future, error=ControlError(f"cannot allocate {demand.num_pages} pages: {reason}"))
        else:
            self.s.fail_instance(instance, f"instance {instance.instance_id!r} was preempted and cannot be "
                                          f"swapped back in: {reason}")

    def _apply(self, plan: StepPlan, direct: list[Chunk]) -> tuple[list[PageCopy], list[ForwardCommand], Sources]:
        """Translates the plan, after the decodes that join directly (never queued), to physical pages and takes
        its commands off the queues."""
        copies = []
        page = self.pool.page
        for instance, copy in plan.copies:
            self.moved.append(instance)
            copies.append(PageCopy(page(copy.src_block_id), page(copy.dst_block_id), copy.src_offset,
                                   copy.dst_offset, copy.num_slots))
        forwards, sources = [], []
        pool = self.pool
        version = pool.placement_version
        chunked: set[InstanceState] = set()  # instances in the middle of a chunked prefill
        direct.extend(plan.chunks)
        for chunk in direct:
            item = chunk.item
            if item.pages_version != version:
                item.pages, item.pages_version = pool.pages(item.block_ids), version
            command, output_ids = item.command(chunk.start, chunk.end, item.pages)  # type: ignore[arg-type]
            item.num_scheduled = end = chunk.end
            if end != item.num_tokens:
                chunked.add(chunk.instance)
            decoding = item.decoding
            if decoding is not None:
                decoding.num_in_flight += 1
            forwards.append(command)
            sources.append((chunk, output_ids))
        active, unqueue = self.s.active, self.s.unqueue
        for instance, num_consumed in plan.num_consumed.items():
            for _ in range(num_consumed):
                unqueue(instance)
        # Round robin: an instance whose commands were all taken goes to the back; one in the middle of a
        # chunked prefill keeps its place (prefills finish in arrival order).
        for instance in {chunk.instance: None for chunk in plan.chunks} | plan.num_consumed:
            if instance not in chunked:
                active.pop(instance, None)
                if instance.queue:
                    active[instance] = None
        return copies, forwards, sources

    # -- results ------------------------------------------------------------------------------------------
    def deliver(self, result: StepResult) -> None:
        """Takes the results of the oldest running step."""
        sources = self._landed(self.s.running.popleft())
        if len(result.results) != len(sources):
            self._fail_sources(sources, ControlError(
                f"the executor returned {len(result.results)} results for {len(sources)} commands"))
            return
        for (chunk, output_ids), command_result in zip(sources, result.results):
            item = chunk.item
            if item.cancelled:
                continue  # closed while running: drop the outputs
            num_wanted = len(item.outputs) if output_ids is None else len(output_ids)
            if len(command_result.outputs) != num_wanted:
                self._fail_chunk(chunk, ControlError(f"the executor returned {len(command_result.outputs)} "
                                                     f"outputs for {num_wanted} requested"))
                continue
            if output_ids is None:  # the whole forward in one command: its result as it is (_finish, inlined)
                if item.decoding is None:
                    self.s.settle(item.future, command_result)
                else:
                    self.s.continue_decode(chunk.instance, item, command_result.outputs[0])
                continue
            item.add_results(output_ids, command_result.outputs)
            if chunk.is_last:
                self._finish(chunk, item.result())
        self.s.continue_grammar_decodes()

    def _finish(self, chunk: Chunk, result: CommandResult) -> None:
        item = chunk.item
        if item.decoding is None:
            self.s.settle(item.future, result)
        else:  # the decode goes on without a round trip to its caller
            self.s.continue_decode(chunk.instance, item, result.outputs[0])

    def fail_inflight(self, error: ControlError) -> None:
        """The executor failed the oldest running step: its forwards fail, and so do the instances whose KV it
        was to swap or copy (their KV is unknown now), and the speculated forwards fed from it."""
        step = self.s.running.popleft()
        self._fail_sources(self._landed(step), error)
        for instance in step.moved:
            if not instance.closed and instance.failure is None:
                self.s.fail_instance(instance, f"instance {instance.instance_id!r} lost its KV cache: {error}")
        for chunk, _ in step.sources:
            decoding = chunk.item.decoding
            if decoding is None:
                continue
            for successor in [s for s in decoding.speculated if s.num_scheduled == 0 and not s.cancelled]:
                decoding.speculated.remove(successor)
                self.s.cancel(successor, error)
                self.s.withdraw(chunk.instance, successor)

    @staticmethod
    def _landed(step: RunningStep) -> Sources:
        """The step's chunks, no longer running."""
        for chunk, _ in step.sources:
            if chunk.item.decoding is not None:
                chunk.item.decoding.num_in_flight -= 1
        return step.sources

    def _fail_sources(self, sources: Sources, error: ControlError) -> None:
        for chunk, _ in sources:
            self._fail_chunk(chunk, error)

    def _fail_chunk(self, chunk: Chunk, error: ControlError) -> None:
        """Fails the chunk's forward; a partly scheduled one leaves its instance's queue."""
        self.s.cancel(chunk.item, error)
        instance = chunk.instance
        if instance.queue and instance.queue[0] is chunk.item:
            self.s.withdraw(instance, chunk.item)

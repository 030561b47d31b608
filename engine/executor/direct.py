"""Drives the executor directly (no control layer, no Wasm): the baseline for benchmarks and the model
checks in tests. Simple static page management: each sequence owns its pages from a free list.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from pie_server.engine.step import Batch, ForwardCommand, OutputSpec, SamplingParams, TokenRef
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.pending import PendingStep


@dataclass
class DirectSequence:
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    page_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the pages

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class DirectGenerator:
    """Greedy-or-sampled generation of many sequences in lockstep batches through Executor.execute."""

    def __init__(self, executor: Executor, scatter_pages: bool = False, seed: int = 0) -> None:
        self.executor = executor
        self.page_size = executor.info.page_size
        self._free_pages = list(range(executor.info.num_pages))
        if scatter_pages:  # non-contiguous, unordered page ids, to test the paging
            random.Random(seed).shuffle(self._free_pages)

    def start(self, prompt_ids: Sequence[int]) -> DirectSequence:
        return DirectSequence(token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids))

    def start_cached(self, prompt_ids: Sequence[int]) -> DirectSequence:
        """A sequence whose prompt, but its last token, counts as cached: its pages are reserved and left
        holding whatever they hold (speed measurements that must not prefill; its outputs mean nothing)."""
        seq = self.start(prompt_ids)
        self._reserve(seq, len(seq.token_ids))
        seq.num_cached = len(seq.token_ids) - 1
        return seq

    def step(self, seqs: Sequence[DirectSequence], sampling: SamplingParams,
             max_tokens_per_seq: int | None = None) -> list[int | None]:
        """One executor call: feed each sequence's uncached tokens (up to max_tokens_per_seq); sample the next
        token for those whose whole context is then cached. Returns the new token per sequence, or None."""
        commands, finishing = [], []
        for seq in seqs:
            end = len(seq.token_ids) if max_tokens_per_seq is None else \
                min(len(seq.token_ids), seq.num_cached + max_tokens_per_seq)
            new_ids = seq.token_ids[seq.num_cached:end]
            self._reserve(seq, end)
            done = end == len(seq.token_ids)
            outputs = [OutputSpec(index=len(new_ids) - 1, sampling=sampling)] if done else []
            commands.append(ForwardCommand(
                token_ids=new_ids, positions=list(range(seq.num_cached, end)), page_ids=list(seq.page_ids),
                last_page_len=end - (len(seq.page_ids) - 1) * self.page_size, outputs=outputs))
            finishing.append(done)
            seq.num_cached = end
        results = self.executor.execute(Batch(forwards=commands)).results
        new_tokens: list[int | None] = []
        for seq, done, result in zip(seqs, finishing, results):
            token = result.outputs[0].token_id if done else None
            if token is not None:
                seq.token_ids.append(token)
            new_tokens.append(token)
        return new_tokens

    def decode_pipelined(self, seqs: Sequence[DirectSequence], sampling: SamplingParams, num_steps: int) -> None:
        """num_steps decode steps, each submitted before the previous one's tokens reach the host (it takes
        them on the device); appends the tokens. Each sequence must have exactly one uncached token."""
        if any(len(s.token_ids) != s.num_cached + 1 for s in seqs):
            raise ValueError("pipelined decoding needs exactly one uncached token per sequence")
        outputs = [OutputSpec(index=0, sampling=sampling)]
        pending: PendingStep | None = None
        for _ in range(num_steps):
            commands = []
            for b, seq in enumerate(seqs):
                end = seq.num_cached + 1
                self._reserve(seq, end)
                fed = None if pending is None else TokenRef(b)
                commands.append(ForwardCommand(
                    token_ids=[0 if fed else seq.token_ids[seq.num_cached]], positions=[seq.num_cached],
                    page_ids=list(seq.page_ids), last_page_len=end - (len(seq.page_ids) - 1) * self.page_size,
                    outputs=outputs, fed_token=fed))
                seq.num_cached = end
            submitted = self.executor.submit(Batch(forwards=commands))
            if pending is not None:
                self._collect(seqs, pending)
            pending = submitted
        if pending is not None:
            self._collect(seqs, pending)

    @staticmethod
    def _collect(seqs: Sequence[DirectSequence], pending: PendingStep) -> None:
        for seq, result in zip(seqs, pending.result().results):
            token = result.outputs[0].token_id
            assert token is not None
            seq.token_ids.append(token)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), pipelined: bool = False) -> list[list[int]]:
        """Lockstep generation; pipelined: after the prefill, decode_pipelined (same tokens, fewer waits)."""
        seqs = [self.start(p) for p in prompts]
        if pipelined and max_new_tokens > 0:
            self.step(seqs, sampling)
            self.decode_pipelined(seqs, sampling, max_new_tokens - 1)
        while any(len(s.output_ids) < max_new_tokens for s in seqs):
            self.step([s for s in seqs if len(s.output_ids) < max_new_tokens], sampling)
        outputs = [s.output_ids for s in seqs]
        for s in seqs:
            self.release(s)
        return outputs

    def release(self, seq: DirectSequence) -> None:
        self._free_pages.extend(seq.page_ids)
        seq.page_ids.clear()
        seq.num_cached = 0

    def _reserve(self, seq: DirectSequence, num_tokens: int) -> None:
        num_needed = -(-num_tokens // self.page_size) - len(seq.page_ids)
        if num_needed > len(self._free_pages):
            raise RuntimeError("out of KV pages")
        for _ in range(num_needed):
            seq.page_ids.append(self._free_pages.pop())

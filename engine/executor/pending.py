"""Pipelined steps: a submitted step whose outputs may still be on the device (PendingStep), and what the
next step may take from it on the device (StepOutputs, read through batch.TokenRef).

Invariant: the executor keeps the StepOutputs of the last step it launched; a TokenRef always points there.
Stream order makes the feed safe: the next step's copy of a referenced token is enqueued after the sampling
that writes it.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pie_server.engine.step import CommandResult, OutputResult, StepResult, TokenRef
from pie_server.engine.executor.sampler import SampledOutputs

_COMMAND_INDEX, _OUTPUT_INDEX = operator.attrgetter("command_index"), operator.attrgetter("output_index")


@dataclass(frozen=True)
class StepOutputs:
    """The sampled tokens of one launched step, on the device, with the map from (command, output) to row."""

    tokens: torch.Tensor  # [N] int64 on the device
    output_starts: np.ndarray  # [B + 1] int64: command b's outputs are rows output_starts[b]:[b + 1]
    unsampled_rows: frozenset[int]  # rows that sampled no token (distributions): no reference may name them

    @classmethod
    def of(cls, sampled: SampledOutputs, counts: Sequence[int]) -> "StepOutputs":
        if _one_each(counts):
            starts = np.arange(len(counts) + 1)
        else:
            starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.asarray(counts, np.int64))])
        return cls(sampled.tokens, starts, sampled.unsampled_rows)

    def rows_of(self, refs: Sequence[TokenRef]) -> np.ndarray:
        """[F] int64 rows of `tokens`; ValueError when a reference names no sampled token of this step."""
        num_commands = len(self.output_starts) - 1
        commands = np.fromiter(map(_COMMAND_INDEX, refs), np.int64, count=len(refs))
        outputs = np.fromiter(map(_OUTPUT_INDEX, refs), np.int64, count=len(refs))
        past = np.flatnonzero(commands >= num_commands)
        if len(past):
            raise ValueError(f"token reference to command {commands[past[0]]}: the previous step had "
                             f"{num_commands} commands")
        starts = self.output_starts[commands]
        rows = starts + outputs
        over = np.flatnonzero(rows >= self.output_starts[commands + 1])
        if len(over):
            f = over[0]
            raise ValueError(f"token reference to output {outputs[f]} of command {commands[f]}, which had "
                             f"{self.output_starts[commands[f] + 1] - starts[f]} outputs")
        if self.unsampled_rows:
            for f, row in enumerate(rows.tolist()):
                if row in self.unsampled_rows:
                    raise ValueError(f"token reference to output {outputs[f]} of command {commands[f]}, "
                                     "a distribution, not a sampled token")
        return rows


class PendingStep:
    """A launched step; result() waits (once) for its outputs to reach the host."""

    def __init__(self, step_id: int, sampled: SampledOutputs | None, num_outputs_per_command: Sequence[int],
                 started_s: float) -> None:
        self.step_id = step_id
        self._sampled = sampled
        self._counts = num_outputs_per_command
        self._started_s = started_s
        self._result: StepResult | None = None

    def is_ready(self) -> bool:
        return self._result is not None or self._sampled is None or self._sampled.is_ready()

    def result(self) -> StepResult:
        if self._result is None:
            outputs = self._sampled.results() if self._sampled is not None else []
            self._result = StepResult(results=_split(outputs, self._counts), step_id=self.step_id,
                                      elapsed_s=time.perf_counter() - self._started_s)
        return self._result


def _split(outputs: list[OutputResult], counts: Sequence[int]) -> tuple[CommandResult, ...]:
    if _one_each(counts) and len(outputs) == len(counts):  # at C speed, the 1-tuples made by zip
        return tuple(map(CommandResult, zip(outputs)))
    results, start = [], 0
    for n in counts:
        results.append(CommandResult(outputs=tuple(outputs[start:start + n])))
        start += n
    return tuple(results)


def _one_each(counts: Sequence[int]) -> bool:
    """Whether every command has exactly one output (every decode step): its rows are its commands."""
    return counts.count(1) == len(counts)

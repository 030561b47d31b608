"""Turns a Batch's forward commands into the step's inputs: token/position arrays, the attention
metadata, and the rows whose logits are wanted. Validates everything before any state changes.

Host work here runs in series with the GPU, once per step over up to hundreds of commands: one Python pass
gathers the commands' fields column-wise, and every check and index computation after it is numpy.
"""
from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pie_server.engine.config import ModelConfig
from pie_server.engine.step import ForwardCommand, OutputSpec, TokenRef
from pie_server.engine.types import PageId, TokenId
from pie_server.kernels.attention import AttentionStep


@dataclass(frozen=True)
class StepInputs:
    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    attention: AttentionStep
    output_rows: np.ndarray  # [N] int64 rows of the T tokens whose logits are wanted
    output_specs: list[OutputSpec]  # [N]
    num_outputs_per_command: list[int]  # [B]
    fed_rows: np.ndarray  # [F] int64 rows of the T tokens that take a token of the previous step
    fed_refs: list[TokenRef]  # [F] where each of them comes from


# Pages per command (on average over a decode step) from which PageArrays pays: below, converting every list
# again costs less than finding the kept ones. 2-core CPU, steady steps as bench.step_inputs makes them, build
# us converted -> kept, since both ways read at C speed: at 16 pages batch 16 / 64 / 256 57-62 -> 64-68,
# 109-117 -> 115-128, 277-290 -> 296-298; at 24 61-66 -> 67-68, 125-136 -> 119-126, 341-368 -> 318-319; at 32
# 68-69 -> 69, 139-154 -> 121-131, 389-406 -> 321-346 (was 48 before).
KEEP_MIN_PAGES = 32


class PageArrays:
    """The page lists of a decode step's commands as int64 arrays, each converted and checked (ids in range, none
    twice) once and kept while the next step's commands hold the same tuple: a steady decode passes its pages on
    unchanged for a page's worth of tokens (engine/control/pages.py), so a step converts only the lists that are
    new, not every page of every context (O(pages) per step: 32,768 ids at batch 64 and 8,192 tokens of context).
    Only tuples are kept (a list may change in place); entries live for one step (those its commands hold). Used
    for decode steps of long contexts (KEEP_MIN_PAGES)."""

    def __init__(self) -> None:
        self._arrays: dict[int, np.ndarray] = {}  # id(tuple) -> its array
        # The tuples of those arrays, held so that no other object can take their ids while they are keys.
        self._held: list[Sequence[PageId]] = []

    def take(self, page_lists: list[Sequence[PageId]], num_pages: int) -> np.ndarray:
        """[sum of their lengths] int64, the lists one after another; ValueError from _check_page_ids (command b =
        index b of page_lists) for the lists converted now."""
        ids = list(map(id, page_lists))
        arrays = list(map(self._arrays.get, ids))
        new_rows = [b for b, array in enumerate(arrays) if array is None] if any(map(_IS_NONE, arrays)) else []
        for b in new_rows:
            pages = page_lists[b]
            arrays[b] = np.fromiter(pages, np.int64, count=len(pages))
        if new_rows:
            owner = np.repeat(np.asarray(new_rows, np.int64), [len(arrays[b]) for b in new_rows])
            _check_page_ids(np.concatenate([arrays[b] for b in new_rows]), owner, num_pages)
        # Only after the checks: a kept array is a checked one.
        if set(map(type, page_lists)) == {tuple}:  # every list a tuple (as the control layer hands them on)
            self._arrays = dict(zip(ids, arrays))  # type: ignore[arg-type]
        else:
            self._arrays = {id(pages): array for pages, array in zip(page_lists, arrays) if type(pages) is tuple}
        self._held = page_lists
        return np.concatenate(arrays)  # type: ignore[arg-type]


def build_step_inputs(commands: Sequence[ForwardCommand], model: ModelConfig, page_size: int,
                      num_pages: int, page_arrays: PageArrays | None = None) -> StepInputs:
    """The step's inputs; ValueError naming the first bad command. Decode steps (one token and no mask in every
    command) take a shorter way to the same inputs and errors; page_arrays: the executor's, kept between steps
    (PageArrays), for that way."""
    fields = _DecodeFields.of(commands) if commands else None
    if fields is not None:
        return _decode_step_inputs(fields, model, page_size, num_pages, page_arrays)
    return _any_step_inputs(commands, model, page_size, num_pages)


def _any_step_inputs(commands: Sequence[ForwardCommand], model: ModelConfig, page_size: int,
                     num_pages: int) -> StepInputs:
    cols = _Columns.gather(commands)
    cmd_ids = np.arange(len(commands))
    num_tokens = np.asarray(cols.num_tokens, np.int64)
    num_cmd_pages = np.asarray(cols.num_pages, np.int64)
    last_lens = np.asarray(cols.last_page_lens, np.int64)
    _check(num_tokens == 0, "needs at least one token")
    _check(np.asarray(cols.num_positions) != num_tokens, "needs one position per token")
    _check_pages(num_cmd_pages, last_lens, page_size)
    context_lens = (num_cmd_pages - 1) * page_size + last_lens
    _check(context_lens < num_tokens, "has more tokens than context slots")

    token_ids, positions, page_ids = cols.token_ids, cols.positions, cols.page_ids
    token_cmd = np.repeat(cmd_ids, num_tokens)
    page_cmd = np.repeat(cmd_ids, num_cmd_pages)
    _check_ids(token_ids, positions, token_cmd, page_ids, page_cmd, model, num_pages)

    qo_indptr = _indptr(num_tokens)
    kv_page_indptr = _indptr(num_cmd_pages)
    # New token i of command b fills context slot context_len - num_tokens + i.
    slots = np.repeat(context_lens - num_tokens - qo_indptr[:-1], num_tokens) + np.arange(len(token_ids))
    slot_ids = page_ids[np.repeat(kv_page_indptr[:-1], num_tokens) + slots // page_size] * page_size \
        + slots % page_size
    _check_unique(slot_ids, token_cmd, "writes a KV slot that another command of the batch writes too")

    for b, mask in enumerate(cols.masks):
        if mask is not None:
            _check_mask(b, mask, int(num_tokens[b]), int(context_lens[b]))
    output_index = np.asarray(cols.output_indices, np.int64)
    output_cmd = np.repeat(cmd_ids, cols.num_outputs)
    _check_range(output_index, num_tokens[output_cmd], output_cmd, "output index")
    step = AttentionStep(page_size=page_size, qo_indptr=qo_indptr, kv_page_indptr=kv_page_indptr,
                         kv_page_ids=page_ids, kv_last_page_lens=last_lens, slot_ids=slot_ids,
                         custom_masks=cols.masks if cols.has_mask else None,
                         source_rows=np.arange(len(token_ids)),  # slot_ids are distinct (checked above)
                         validated=True)
    fed_rows = qo_indptr[np.asarray(cols.fed_commands, np.int64) + 1] - 1
    return StepInputs(token_ids, positions, step, output_index + qo_indptr[output_cmd], cols.output_specs,
                      cols.num_outputs, fed_rows, cols.fed_refs)


# A command's fields in one tuple, read at C speed (map over the commands, zip to transpose): a decode step's
# fields from 64 commands took ~9 Python comprehensions before (bench.step_inputs, 2-core CPU).
_FIELDS = operator.attrgetter("token_ids", "positions", "page_ids", "last_page_len", "outputs", "fed_token",
                              "attention_mask")
_INDEX = operator.attrgetter("index")
# Identity tests at C speed (`x == None` would call a TokenRef's Python __eq__ per row).
_IS_NONE, _IS_NOT_NONE = functools.partial(operator.is_, None), functools.partial(operator.is_not, None)


@dataclass(frozen=True)
class _DecodeFields:
    """The fields of a decode step's commands (one token and no mask each), column by column."""

    token_lists: tuple[Sequence[TokenId], ...]
    position_lists: tuple[Sequence[int], ...]
    page_lists: tuple[Sequence[PageId], ...]
    last_page_lens: tuple[int, ...]
    output_lists: tuple[Sequence[OutputSpec], ...]
    fed_tokens: tuple[TokenRef | None, ...]

    @classmethod
    def of(cls, commands: Sequence[ForwardCommand]) -> "_DecodeFields | None":
        """None when some command is not a decode (more or fewer tokens than one, or a mask)."""
        tokens, positions, pages, last_lens, outputs, fed, masks = zip(*map(_FIELDS, commands))
        if any(map(_IS_NOT_NONE, masks)) or list(map(len, tokens)).count(1) != len(tokens):
            return None
        return cls(tokens, positions, pages, last_lens, outputs, fed)


def _decode_step_inputs(fields: _DecodeFields, model: ModelConfig, page_size: int, num_pages: int,
                        page_arrays: PageArrays | None = None) -> StepInputs:
    """build_step_inputs for commands of one token each and no mask (every decode step): the same inputs and
    the same errors, from fewer passes (token b is row b, its slot the last of its context)."""
    num_seqs = len(fields.token_lists)
    cmd_ids = np.arange(num_seqs)
    token_ids = np.fromiter(itertools.chain.from_iterable(fields.token_lists), np.int64, count=num_seqs)
    num_positions = np.fromiter(map(len, fields.position_lists), np.int64, count=num_seqs)
    num_cmd_pages = np.fromiter(map(len, fields.page_lists), np.int64, count=num_seqs)
    last_lens = np.fromiter(fields.last_page_lens, np.int64, count=num_seqs)
    _check(num_positions != 1, "needs one position per token")
    _check_pages(num_cmd_pages, last_lens, page_size)
    positions = np.fromiter(itertools.chain.from_iterable(fields.position_lists), np.int64, count=num_seqs)
    total_pages = int(num_cmd_pages.sum())
    if page_arrays is None or total_pages < KEEP_MIN_PAGES * num_seqs:
        page_ids = _flat(fields.page_lists, total_pages)
        _check_ids(token_ids, positions, cmd_ids, page_ids, np.repeat(cmd_ids, num_cmd_pages), model, num_pages)
    else:  # the same checks in the same order, the pages' only for lists not kept from the step before
        _check_token_ids(token_ids, positions, cmd_ids, model)
        page_ids = page_arrays.take(list(fields.page_lists), num_pages)
    qo_indptr = np.arange(num_seqs + 1)
    kv_page_indptr = _indptr(num_cmd_pages)
    slot_ids = page_ids[kv_page_indptr[1:] - 1] * page_size + last_lens - 1  # the last slot of each context
    _check_unique(slot_ids, cmd_ids, "writes a KV slot that another command of the batch writes too")
    output_specs = list(itertools.chain.from_iterable(fields.output_lists))
    num_outputs = list(map(len, fields.output_lists))
    output_index = np.fromiter(map(_INDEX, output_specs), np.int64, count=len(output_specs))
    output_cmd = np.arange(num_seqs) if num_outputs.count(1) == num_seqs else np.repeat(cmd_ids, num_outputs)
    _check_range(output_index, 1, output_cmd, "output index")
    step = AttentionStep(page_size=page_size, qo_indptr=qo_indptr, kv_page_indptr=kv_page_indptr,
                         kv_page_ids=page_ids, kv_last_page_lens=last_lens, slot_ids=slot_ids,
                         source_rows=cmd_ids, validated=True)  # slot_ids are distinct (checked above)
    fed = fields.fed_tokens
    if not any(map(_IS_NONE, fed)):  # a steady decode step: every row takes its token from the step before
        return StepInputs(token_ids, positions, step, output_cmd, output_specs, num_outputs, np.arange(num_seqs),
                          list(fed))
    fed_rows = [b for b, ref in enumerate(fed) if ref is not None]
    return StepInputs(token_ids, positions, step, output_cmd, output_specs, num_outputs,
                      np.asarray(fed_rows, np.int64), [fed[b] for b in fed_rows])


@dataclass
class _Columns:
    """The commands' fields gathered column-wise: one comprehension per field, each a tight loop over the
    commands (cheaper than one loop that appends every field in turn: build_step_inputs over 64 decodes 152 ->
    136 us on the 2-core CPU machine)."""

    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [sum of the commands' positions] int64
    page_ids: np.ndarray  # [sum of their pages] int64
    num_tokens: list[int]
    num_positions: list[int]
    num_pages: list[int]
    last_page_lens: list[int]
    masks: list
    has_mask: bool
    output_indices: list[int]
    output_specs: list[OutputSpec]
    num_outputs: list[int]
    fed_commands: list[int]
    fed_refs: list[TokenRef]

    @classmethod
    def gather(cls, commands: Sequence[ForwardCommand]) -> "_Columns":
        num_tokens = [len(c.token_ids) for c in commands]
        num_positions = [len(c.positions) for c in commands]
        num_pages = [len(c.page_ids) for c in commands]
        masks = [c.attention_mask for c in commands]
        output_specs = [o for c in commands for o in c.outputs]
        fed = [(b, c.fed_token) for b, c in enumerate(commands) if c.fed_token is not None]
        return cls(
            token_ids=_flat([c.token_ids for c in commands], sum(num_tokens)),
            positions=_flat([c.positions for c in commands], sum(num_positions)),
            page_ids=_flat([c.page_ids for c in commands], sum(num_pages)),
            num_tokens=num_tokens, num_positions=num_positions, num_pages=num_pages,
            last_page_lens=[c.last_page_len for c in commands],
            masks=masks, has_mask=any(m is not None for m in masks),
            output_indices=[o.index for o in output_specs], output_specs=output_specs,
            num_outputs=[len(c.outputs) for c in commands],
            fed_commands=[b for b, _ in fed], fed_refs=[ref for _, ref in fed])


def _flat(parts: list[Sequence[int]], total: int) -> np.ndarray:
    """[total] int64: the parts one after another (ids outside int64 raise, as np.asarray would)."""
    return np.fromiter(itertools.chain.from_iterable(parts), np.int64, count=total)


def _indptr(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])


def _check(bad: np.ndarray, what: str) -> None:
    """bad: [B] bool per command."""
    if bad.any():
        raise ValueError(f"forward command {int(np.argmax(bad))} {what}")


def _check_pages(num_cmd_pages: np.ndarray, last_lens: np.ndarray, page_size: int) -> None:
    """[B] pages and last page lengths per command."""
    _check(num_cmd_pages == 0, "needs at least one page")
    _check((last_lens < 1) | (last_lens > page_size), f"needs 1 <= last_page_len <= {page_size}")


def _check_ids(token_ids: np.ndarray, positions: np.ndarray, token_cmd: np.ndarray, page_ids: np.ndarray,
               page_cmd: np.ndarray, model: ModelConfig, num_pages: int) -> None:
    """Ids within their ranges and no page twice in a command; *_cmd: the command of each token or page."""
    _check_token_ids(token_ids, positions, token_cmd, model)
    _check_page_ids(page_ids, page_cmd, num_pages)


def _check_token_ids(token_ids: np.ndarray, positions: np.ndarray, token_cmd: np.ndarray, model: ModelConfig) -> None:
    _check_range(token_ids, model.vocab_size, token_cmd, "token id")
    _check_range(positions, model.max_position_embeddings, token_cmd, "position")


def _check_page_ids(page_ids: np.ndarray, page_cmd: np.ndarray, num_pages: int) -> None:
    _check_range(page_ids, num_pages, page_cmd, "page id")
    _check_unique(page_cmd * num_pages + page_ids, page_cmd, "lists a page twice")


def _check_range(values: np.ndarray, limit: int | np.ndarray, owner: np.ndarray, what: str) -> None:
    """limit: one bound for all values, or one per value."""
    if np.isscalar(limit) and values.dtype == np.int64:  # one comparison: a negative value reads as a huge one
        if not (values.view(np.uint64) >= limit).any():
            return
    bad = (values < 0) | (values >= limit)
    if bad.any():
        i = int(np.argmax(bad))
        bound = limit if np.isscalar(limit) else int(limit[i])
        raise ValueError(f"forward command {int(owner[i])}: {what} {int(values[i])} out of range [0, {bound})")


def _check_unique(keys: np.ndarray, owner: np.ndarray, what: str) -> None:
    order = np.argsort(keys, kind="stable")
    repeats = keys[order[1:]] == keys[order[:-1]]
    if repeats.any():
        raise ValueError(f"forward command {int(owner[order[1:][np.argmax(repeats)]])} {what}")


def _check_mask(b: int, mask: Sequence[Sequence[bool]], num_tokens: int, context_len: int) -> None:
    if len(mask) != num_tokens or any(len(row) != context_len for row in mask):
        raise ValueError(f"forward command {b}: attention mask must be [{num_tokens}][{context_len}]")
    if not all(any(row) for row in mask):
        raise ValueError(f"forward command {b}: every attention mask row must allow at least one slot")

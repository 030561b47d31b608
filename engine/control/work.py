"""Queued commands of an instance: forwards (validated, maybe split into chunks) and slot copies.

A forward's context is its pages filled to context_len; its tokens are the last num_tokens slots (see
engine/step.py). A chunk [start, end) of the tokens is itself a valid command over the first
`base + end` slots (base = context_len - num_tokens): the earlier tokens' KV was written by earlier chunks.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from pie_server.engine.control.api import ControlError, VirtualForward
from pie_server.engine.control.decoding import DecodeRequest, DecodeStream, Decoding
from pie_server.engine.grammar import GrammarMatcher
from pie_server.engine.control.page_table import PageTable
from pie_server.engine.control.pages import BlockId
from pie_server.engine.step import CommandResult, ForwardCommand, OutputResult, OutputSpec, TokenRef
from pie_server.engine.types import PageId, VirtualPageId


# The per-token constructors of the decode path pass their fields positionally (keywords cost about a third
# more per call there), in this order; tests/engine/control/test_hot_path.py checks it against the classes.
HOT_FIELD_ORDER = {
    "ForwardItem": ("token_ids", "positions", "page_ids", "block_ids", "context_len", "page_size", "outputs", "mask",
                    "chunkable", "future"),
    "ForwardCommand": ("token_ids", "positions", "page_ids", "last_page_len", "outputs", "attention_mask",
                       "fed_token"),
}


@dataclass(frozen=True)
class Limits:
    page_size: int
    max_context_len: int
    vocab_size: int | None = None
    max_position: int | None = None


@dataclass(eq=False)
class CopyItem:
    src_page_id: VirtualPageId
    dst_page_id: VirtualPageId
    src_block_id: BlockId
    dst_block_id: BlockId
    src_offset: int
    dst_offset: int
    num_slots: int

    @property
    def page_ids(self) -> tuple[VirtualPageId, VirtualPageId]:
        return self.src_page_id, self.dst_page_id

    @property
    def written_ids(self) -> tuple[VirtualPageId]:
        return (self.dst_page_id,)


@dataclass(eq=False, slots=True)
class ForwardItem:
    """A validated forward. Its blocks are resolved at submission: a virtual id names the same block for as
    long as a queued command uses it (see PageTable), while the block's physical page may change."""

    token_ids: list[int]
    positions: list[int]
    page_ids: list[VirtualPageId]
    block_ids: list[BlockId]
    context_len: int
    page_size: int
    outputs: tuple[OutputSpec, ...]
    # The effective mask [num_tokens][context_len] (user mask or causal, AND slot visibility), or None.
    mask: list[list[bool]] | None
    chunkable: bool  # False when a mask row looks ahead of its token (all tokens must run in one chunk)
    future: Future[CommandResult]
    num_tokens: int = 0
    base: int = 0  # context_len - num_tokens: slots before the first new token
    write_start: int = 0  # the new tokens' KV goes into page_ids[write_start:] (the context ends there)
    num_scheduled: int = 0  # tokens already handed to a batch
    results: dict[int, OutputResult] | None = None  # by index into outputs, while chunks come back
    cancelled: bool = False
    decoding: Decoding | None = None  # set on the forwards of a decode (decoding.py): future is its stream's done
    fed: TokenRef | None = None  # the last token comes from the step running before (pipelined decodes)
    wasted: bool = False  # a speculated decode forward past the decode's end: its output is dropped
    # The physical pages of block_ids as of PagePool.placement_version pages_version (None: not looked up yet);
    # a decode's next forward over the same blocks takes them over (batch formation's page lookup, once).
    pages: tuple[PageId, ...] | None = None
    pages_version: int = -1

    def __post_init__(self) -> None:
        self.num_tokens = len(self.token_ids)
        self.base = self.context_len - self.num_tokens
        self.write_start = self.base // self.page_size

    @property
    def num_remaining(self) -> int:
        return self.num_tokens - self.num_scheduled

    @property
    def written_ids(self) -> list[VirtualPageId]:
        return self.page_ids[self.write_start:]

    @property
    def written_block_ids(self) -> list[BlockId]:
        return self.block_ids[self.write_start:]

    def command(self, start: int, end: int, pages: Sequence[PageId]) -> tuple[ForwardCommand, list[int] | None]:
        """The command for tokens [start, end) over the physical pages of the whole context; also the
        indices (into outputs) of the outputs it carries, in its order (None: all of them, as they are)."""
        page_size = self.page_size
        if start == 0 and end == self.num_tokens:  # every decode step: positional, see HOT_FIELD_ORDER
            return ForwardCommand(self.token_ids, self.positions, pages,
                                  self.context_len - (len(pages) - 1) * page_size, self.outputs, self.mask,
                                  self.fed), None
        chunk_context = self.base + end
        num_pages = -(-chunk_context // page_size)
        output_ids = [k for k, o in enumerate(self.outputs) if start <= o.index < end]
        outputs = tuple(replace(self.outputs[k], index=self.outputs[k].index - start) for k in output_ids)
        mask = None if self.mask is None else [row[:chunk_context] for row in self.mask[start:end]]
        return ForwardCommand(
            token_ids=self.token_ids[start:end], positions=self.positions[start:end],
            page_ids=list(pages[:num_pages]), last_page_len=chunk_context - (num_pages - 1) * page_size,
            outputs=outputs, attention_mask=mask), output_ids

    def add_results(self, output_ids: list[int], outputs: Sequence[OutputResult]) -> None:
        if self.results is None:
            self.results = {}
        self.results.update(zip(output_ids, outputs))

    def result(self) -> CommandResult:
        results = self.results or {}
        return CommandResult(outputs=tuple(results[k] for k in range(len(self.outputs))))


def queued_page_ids(queue: Iterable[ForwardItem | CopyItem], written: bool = False) -> set[VirtualPageId]:
    """The pages that queued commands use (or, if written, write)."""
    page_ids: set[VirtualPageId] = set()
    for item in queue:
        page_ids.update(item.written_ids if written else item.page_ids)
    return page_ids


def prepare_forward(command: VirtualForward, table: PageTable, limits: Limits,
                    future: Future[CommandResult]) -> ForwardItem:
    """Validates a forward against the instance's table (raises ControlError) and builds its queue item."""
    token_ids, positions = list(command.token_ids), list(command.positions)
    num_tokens = len(token_ids)
    if num_tokens == 0 or len(positions) != num_tokens:
        raise ControlError(f"a forward needs >= 1 token and one position per token; got {num_tokens} tokens "
                           f"and {len(positions)} positions")
    _check_values(token_ids, positions, limits)
    page_ids = list(command.page_ids)
    if not page_ids:
        raise ControlError("a forward needs at least one page")
    block_ids = table.blocks(page_ids, distinct=True)
    page_size = limits.page_size
    if not 1 <= command.last_page_len <= page_size:
        raise ControlError(f"last_page_len must be in [1, {page_size}], got {command.last_page_len}")
    context_len = (len(page_ids) - 1) * page_size + command.last_page_len
    if context_len < num_tokens:
        raise ControlError(f"{num_tokens} new tokens do not fit a context of {context_len} slots "
                           f"({len(page_ids)} pages, last page holds {command.last_page_len})")
    if context_len > limits.max_context_len:
        raise ControlError(f"context of {context_len} slots exceeds the maximum {limits.max_context_len}")
    outputs = tuple(command.outputs)
    for output in outputs:
        if not isinstance(output, OutputSpec):
            raise ControlError(f"outputs must be OutputSpec, got {type(output).__name__}")
        if not 0 <= output.index < num_tokens:
            raise ControlError(f"output index {output.index} out of range [0, {num_tokens})")
    mask = _effective_mask(command.attention_mask, page_ids, table, num_tokens, context_len)
    return ForwardItem(token_ids=token_ids, positions=positions, page_ids=page_ids, block_ids=block_ids,
                       context_len=context_len, page_size=page_size, outputs=outputs, mask=mask,
                       chunkable=command.attention_mask is None or _is_causal_bounded(mask, context_len),
                       future=future)


def first_item(request: DecodeRequest, stream: DecodeStream, table: PageTable, limits: Limits,
               grammar: GrammarMatcher | None = None) -> ForwardItem:
    """The first forward of a decode: request's pending tokens over the pages that their context needs (grammar:
    request.grammar's matcher)."""
    decoding = Decoding.of(request, stream, grammar)
    return _decode_item(decoding, list(request.token_ids), request.position, request.context_len, table, limits)


def next_item(item: ForwardItem, token_id: int, table: PageTable, limits: Limits) -> ForwardItem:
    """The decode's next forward: the token item's step sampled, in the slot after item's context."""
    decoding = item.decoding
    assert decoding is not None
    position, context_len = item.positions[-1] + 1, item.context_len + 1
    if decoding.table_version == table.version and item.mask is None and item.num_tokens == 1 \
            and context_len <= limits.max_context_len \
            and (limits.max_position is None or position < limits.max_position) \
            and 0 <= token_id and (limits.vocab_size is None or token_id < limits.vocab_size):
        # The common step: item's pages, validated at this table version (no page freed or masked since), so
        # prepare_forward's checks would all pass and give item's blocks again; the same outputs, or for a decode
        # that follows tokens (a grammar's mask, penalties' output) its one output with the next sampling
        # parameters (ControlError if the grammar allows nothing, as from _decode_item). Positional (see
        # HOT_FIELD_ORDER): token_ids, positions, page_ids, block_ids, context_len, page_size, outputs, mask,
        # chunkable, future.
        page_ids, block_ids, pages = item.page_ids, item.block_ids, item.pages
        if context_len > len(page_ids) * limits.page_size:  # the token opens the decode's next page
            grown = _grown(decoding, page_ids, block_ids, table)
            if grown is None:
                return _decode_item(decoding, [token_id], position, item.context_len, table, limits)
            page_ids, block_ids, pages = *grown, None
        outputs = (OutputSpec(0, decoding.next_sampling()),) if decoding.follows_tokens else item.outputs
        successor = ForwardItem([token_id], [position], page_ids, block_ids, context_len, limits.page_size,
                                outputs, None, True, item.future)
        successor.decoding = decoding
        if pages is not None:
            successor.pages, successor.pages_version = pages, item.pages_version
        return successor
    return _decode_item(decoding, [token_id], position, item.context_len, table, limits)


def _grown(decoding: Decoding, page_ids: list[VirtualPageId], block_ids: list[BlockId],
           table: PageTable) -> tuple[list[VirtualPageId], list[BlockId]] | None:
    """page_ids and their blocks with the decode's next page, checked as prepare_forward checks it (known,
    listed once, every slot visible); None when it fails, or the decode has no next page (prepare_forward
    then says why)."""
    if len(page_ids) >= len(decoding.page_ids):
        return None
    page_id = decoding.page_ids[len(page_ids)]
    block_id = table.get_block(page_id)
    if block_id is None or page_id in page_ids or table.has_hidden_slots((page_id,)):
        return None
    return [*page_ids, page_id], [*block_ids, block_id]


def _decode_item(decoding: Decoding, token_ids: list[int], position: int, context_len: int, table: PageTable,
                 limits: Limits) -> ForwardItem:
    command = decoding.forward(token_ids, position, context_len, limits.page_size)
    item = prepare_forward(command, table, limits, decoding.stream.done)  # type: ignore[arg-type]
    item.decoding = decoding
    decoding.table_version = table.version
    return item


def check_copy(table: PageTable, src_page_id: VirtualPageId, dst_page_id: VirtualPageId, src_offset: int,
               dst_offset: int, num_slots: int) -> CopyItem:
    src_block_id, dst_block_id = table.block(src_page_id), table.block(dst_page_id)
    page_size = table.page_size
    if num_slots <= 0:
        raise ControlError(f"num_slots must be positive, got {num_slots}")
    for name, offset in (("src_offset", src_offset), ("dst_offset", dst_offset)):
        if offset < 0 or offset + num_slots > page_size:
            raise ControlError(f"{name} {offset} + num_slots {num_slots} is outside the page [0, {page_size})")
    return CopyItem(src_page_id, dst_page_id, src_block_id, dst_block_id, src_offset, dst_offset, num_slots)


def _check_values(token_ids: list[int], positions: list[int], limits: Limits) -> None:
    if min(token_ids) < 0 or (limits.vocab_size is not None and max(token_ids) >= limits.vocab_size):
        bad = next(t for t in token_ids if t < 0 or (limits.vocab_size is not None and t >= limits.vocab_size))
        raise ControlError(f"token id {bad} out of range [0, {limits.vocab_size})")
    if min(positions) < 0 or (limits.max_position is not None and max(positions) >= limits.max_position):
        bad = next(p for p in positions if p < 0 or (limits.max_position is not None and p >= limits.max_position))
        raise ControlError(f"position {bad} out of range [0, {limits.max_position})")


def _effective_mask(user_mask: Sequence[Sequence[bool]] | None, page_ids: list[VirtualPageId],
                    table: PageTable, num_tokens: int, context_len: int) -> list[list[bool]] | None:
    """user mask (or causal) AND slot visibility; None when that is plain causal."""
    hidden = table.has_hidden_slots(page_ids)
    if user_mask is None and not hidden:
        return None
    page_size = table.page_size
    visible: list[bool] = []
    for page_id in page_ids:
        visible.extend(table.visibility(page_id) or [True] * page_size)
    del visible[context_len:]
    base = context_len - num_tokens
    if user_mask is None:
        rows = [[v and j <= base + i for j, v in enumerate(visible)] for i in range(num_tokens)]
    else:
        if len(user_mask) != num_tokens or any(len(row) != context_len for row in user_mask):
            raise ControlError(f"attention_mask must be [num_tokens={num_tokens}][context_len={context_len}]")
        rows = [[bool(m) and v for m, v in zip(row, visible)] for row in user_mask]
    for i, row in enumerate(rows):
        if not any(row):
            raise ControlError(f"attention mask row {i} hides every slot (after masked slots are removed)")
    return rows


def _is_causal_bounded(mask: list[list[bool]] | None, context_len: int) -> bool:
    """True when no row i attends past its own slot (so the tokens can run in chunks)."""
    if mask is None:
        return True
    base = context_len - len(mask)
    return not any(any(row[base + i + 1:]) for i, row in enumerate(mask))

"""A running decode's next room (engine/runtime/api_generate.py's decode in the control layer): once the decode
has used half of its room, the host takes pages for the next room if they are free (try_allocate_pages: never a
waiting demand, so never a preemption of others) and gives them to the running decode (extend_decode), so it does
not stop at its room for the round trip of an allocation and a new decode. Declined, the decode ends at its room
and the loop allocates (and waits) as before.

A room grows with its decode (next_room_tokens): as large as what the sequence has generated, from the first room up
to MAX_ROOM_GROWTH times it, so a long decode asks for room geometrically less often (each top-up is a call and a
reply, then another call, that the engine core serves between its steps: on the 2-core CPU with the emulated device,
batch 64 over one front end, fixed rooms of 16 pages instead of 4 cut the engine core's loop's slowest tenth of
cycles off the CPU from 0.38-0.58 to 0.15-0.27 ms), while a short one holds no more pages ahead than before."""
from __future__ import annotations

from concurrent.futures import Future

from pie_server.engine.control.api import ControlError, call_later
from pie_server.engine.control.decoding import DecodeStream
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.sequence import FINISH_EVICTED, Sequence, free_later

TopUps = dict[int, tuple[Sequence, Future[list[int]]]]  # id(seq) -> the pages being taken for its decode
MAX_ROOM_GROWTH = 8  # a decode's room grows up to this many times the first (a front end's 8 pages: 1,024 tokens)


def next_room_tokens(room_tokens: int, num_generated: int) -> int:
    """The next room of a decode whose sequence has generated num_generated tokens, given a first room of
    room_tokens: as many as it generated, at least room_tokens, at most MAX_ROOM_GROWTH times that."""
    return min(max(room_tokens, num_generated), MAX_ROOM_GROWTH * room_tokens)


def start_top_up(host: Host, inst: InstanceState, seq: Sequence, room_tokens: int, top_ups: TopUps) -> None:
    """Allocates seq's next room (next_room_tokens) once its free slots are fewer than half of that room (and it
    needs more); room_tokens: the first room's."""
    page_size = host.model.page_size
    num_free = len(seq.pages) * page_size - seq.context_len - len(seq.pending)  # slots after the pending tokens
    num_wanted = seq.num_slots_wanted(host.model.max_context_len) - num_free
    room = next_room_tokens(room_tokens, len(seq.generated))
    if not seq.active or num_wanted <= 0 or 2 * num_free >= room:
        return
    num_pages = -(-min(num_wanted, room) // page_size)
    try:
        top_ups[id(seq)] = (seq, call_later(host.control, "try_allocate_pages", inst.id, num_pages))
    except ControlError:
        pass  # a quota refused at once: the decode ends at its room, and the next round's allocation says why


def extend_decodes(host: Host, inst: InstanceState, streams: dict[int, tuple[Sequence, DecodeStream]],
                   top_ups: TopUps, declined: set[int]) -> None:
    """The allocations done: their pages are the sequences', and follow the pages of their running decodes."""
    for key, (seq, future) in list(top_ups.items()):
        if not future.done():
            continue
        del top_ups[key]
        pages = future.exception() or future.result()
        num_pages_before = len(seq.pages)  # the running decode's (it was given seq.pages, and every extension)
        if not take_top_up(host, inst, seq, pages):
            declined.add(key)
        elif key in streams:
            host.control.extend_decode(inst.id, streams[key][1], pages, num_pages_before)


def take_top_up(host: Host, inst: InstanceState, seq: Sequence, pages: list[int] | BaseException) -> bool:
    """Whether the allocation's pages are seq's now (a failed or declined one gives none: the next round
    allocates and reports; pages that came after an eviction dropped the sequence's KV are freed)."""
    if isinstance(pages, BaseException) or not pages:
        return False
    if seq.finish_reason == FINISH_EVICTED:
        free_later(host.control, inst.id, pages)
        return False
    seq.pages.extend(pages)
    seq.allocated.extend(pages)
    return True

"""Host functions of `kv` (pages, sharing) and `prefix-cache`: thin, validated calls into api.Control.

The calls go through call_later: with the engine core in another process the scheduler thread runs other
instances while the reply is on its way, instead of blocking all of them for the round trip."""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

from pie_server.engine.control.api import ControlError, call_later
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import HostFunction, expect
from pie_server.engine.runtime.instance import HostTaskGen, InstanceState

PAGES_RESULT = ("result", ("list", "u32"), "string")
UNIT_RESULT = ("result", None, "string")
PREFIX_MATCH = ("record", ("page-ids", ("list", "u32")), ("num-tokens", "u32"))
PAGE_USAGE = ("record", ("num-page-ids", "u32"), ("num-physical-pages", "u32"), ("num-shared-pages", "u32"))
MAX_PAGES_PER_CALL = 1 << 16
MAX_EXPORT_NAME_BYTES = 256


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    for token_id in token_ids:
        expect(token_id < vocab_size, f"token id {token_id} is outside the vocabulary (size {vocab_size})")


def export_prefix(tenant: str) -> str:
    """Exports are named globally in the control layer (one engine core serves every front end), so a tenant's
    export names live there under a prefix of its own: no tenant can import, unexport or list another's. The
    prefix is derived from the tenant alone, so every process agrees on it."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16] + "/"


@contextlib.contextmanager
def _plain_names(scoped: str, name: str) -> Iterator[None]:
    """The control layer's errors name the scoped export; the inferlet knows it by its own name."""
    try:
        yield
    except ControlError as error:
        raise ControlError(str(error).replace(scoped, name)) from None


def functions(host: Host) -> list[HostFunction]:
    control = host.control
    page_size = host.model.page_size

    def allocate_pages(inst: InstanceState, num_pages: int) -> HostTaskGen:
        expect(0 < num_pages <= MAX_PAGES_PER_CALL, f"num-pages must be in [1, {MAX_PAGES_PER_CALL}]")
        page_ids = yield control.allocate_pages(inst.id, num_pages)
        return ("ok", list(page_ids))

    def free_pages(inst: InstanceState, page_ids: list[int]) -> HostTaskGen:
        yield call_later(control, "free_pages", inst.id, page_ids)
        return ("ok", None)

    def copy_slots(inst: InstanceState, src: int, dst: int, src_offset: int, dst_offset: int,
                   num_slots: int) -> HostTaskGen:
        expect(num_slots > 0, "num-slots must be positive")
        expect(src_offset + num_slots <= page_size and dst_offset + num_slots <= page_size,
               f"slot ranges must lie within a page of {page_size} slots")
        yield call_later(control, "copy_slots", inst.id, src, dst, src_offset, dst_offset, num_slots)
        return ("ok", None)

    def mask_slots(inst: InstanceState, page_id: int, slot_mask: list[bool]) -> HostTaskGen:
        expect(len(slot_mask) == page_size, f"slot-mask needs {page_size} entries, got {len(slot_mask)}")
        yield call_later(control, "mask_slots", inst.id, page_id, slot_mask)
        return ("ok", None)

    def share_pages(inst: InstanceState, page_ids: list[int]) -> HostTaskGen:
        shared = yield call_later(control, "share_pages", inst.id, page_ids)
        return ("ok", list(shared))

    def check_name(name: str) -> None:
        expect(0 < len(name.encode()) <= MAX_EXPORT_NAME_BYTES,
               f"an export name is 1 to {MAX_EXPORT_NAME_BYTES} bytes")

    def export_pages(inst: InstanceState, page_ids: list[int], name: str) -> tuple[str, None]:
        check_name(name)
        expect(len(page_ids) > 0, "export at least one page")
        scoped = export_prefix(inst.tenant) + name
        with _plain_names(scoped, name):
            control.export_pages(inst.id, page_ids, scoped)
        return ("ok", None)

    def import_pages(inst: InstanceState, name: str) -> tuple[str, list[int]]:
        check_name(name)
        scoped = export_prefix(inst.tenant) + name
        with _plain_names(scoped, name):
            return ("ok", list(control.import_pages(inst.id, scoped)))

    def unexport_pages(inst: InstanceState, name: str) -> tuple[str, None]:
        check_name(name)
        scoped = export_prefix(inst.tenant) + name
        with _plain_names(scoped, name):
            control.unexport_pages(scoped)
        return ("ok", None)

    def list_exports(inst: InstanceState) -> list[str]:
        prefix = export_prefix(inst.tenant)
        return [name[len(prefix):] for name in control.list_exports() if name.startswith(prefix)]

    def page_usage(inst: InstanceState, page_ids: list[int] | None) -> HostTaskGen:
        expect(page_ids is None or len(page_ids) <= MAX_PAGES_PER_CALL,
               f"at most {MAX_PAGES_PER_CALL} page ids per call")
        num_ids, num_physical, num_shared = yield call_later(control, "page_usage", inst.id, page_ids)
        return ("ok", {"num-page-ids": num_ids, "num-physical-pages": num_physical, "num-shared-pages": num_shared})

    def lookup(inst: InstanceState, token_ids: list[int]) -> HostTaskGen:
        check_token_ids(token_ids, host.model.vocab_size)
        page_ids, num_tokens = yield call_later(control, "prefix_lookup", inst.id, token_ids)
        return ("ok", {"page-ids": list(page_ids), "num-tokens": num_tokens})

    def publish(inst: InstanceState, token_ids: list[int], page_ids: list[int]) -> HostTaskGen:
        check_token_ids(token_ids, host.model.vocab_size)
        expect(len(page_ids) * page_size <= len(token_ids),
               "publish only full pages: len(page-ids) * page-size must be <= len(token-ids)")
        yield call_later(control, "prefix_publish", inst.id, token_ids, page_ids)
        return ("ok", None)

    return [
        HostFunction("kv", "allocate-pages", allocate_pages, PAGES_RESULT),
        HostFunction("kv", "free-pages", free_pages, UNIT_RESULT),
        HostFunction("kv", "copy-slots", copy_slots, UNIT_RESULT),
        HostFunction("kv", "mask-slots", mask_slots, UNIT_RESULT),
        HostFunction("kv", "share-pages", share_pages, PAGES_RESULT),
        HostFunction("kv", "export-pages", export_pages, UNIT_RESULT),
        HostFunction("kv", "import-pages", import_pages, PAGES_RESULT),
        HostFunction("kv", "unexport-pages", unexport_pages, UNIT_RESULT),
        HostFunction("kv", "list-exports", list_exports, ("list", "string")),
        HostFunction("kv", "page-usage", page_usage, ("result", PAGE_USAGE, "string")),
        HostFunction("prefix-cache", "lookup", lookup, ("result", PREFIX_MATCH, "string")),
        HostFunction("prefix-cache", "publish", publish, UNIT_RESULT),
    ]

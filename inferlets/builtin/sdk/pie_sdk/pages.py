"""What the instance's KV pages cost: how many physical pages its page ids name, and how many are shared."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from wit_world.imports import kv

from .errors import call


@dataclass(frozen=True)
class PageUsage:
    num_page_ids: int  # the ids counted
    num_physical_pages: int  # distinct physical pages they name (ids sharing a page count once)
    num_shared_pages: int  # of those, referenced more than once anywhere (forks, exports, prefix cache): read-only


def page_usage(page_ids: Sequence[int] | None = None) -> PageUsage:
    """The usage of page_ids, or of every page this instance holds (None). One host call."""
    raw = call(kv.page_usage, None if page_ids is None else [int(p) for p in page_ids])
    return PageUsage(raw.num_page_ids, raw.num_physical_pages, raw.num_shared_pages)


def is_shared(page_id: int) -> bool:
    """Whether a forward would be refused writing into this page (it is shared, hence read-only)."""
    return page_usage([page_id]).num_shared_pages > 0

"""Reusing KV across requests and instances: the engine's prefix cache, and named page exports.

Both share only *full* pages: a shared page is read-only, so the partly filled last page stays private
to its owner (who keeps writing into it) and the few tokens it holds are recomputed by whoever reuses
the prefix. Contexts here are standard ones: token i sits in KV slot i at position i.
"""
from __future__ import annotations

import json
from typing import Sequence

from wit_world.imports import kv, prefix_cache

from .context import Context
from .errors import PieError, call
from .services import store_get, store_set, store_delete

_EXPORT_KEY = "pie_sdk/exports/"


def fill_cached(ctx: Context, text_or_ids: str | Sequence[int]) -> int:
    """Fill an empty context, reusing the longest cached page-aligned prefix of the tokens from the
    engine's prefix cache. Returns how many tokens were reused (their KV is not recomputed)."""
    _require_empty(ctx, "fill_cached")
    token_ids = ctx.fill(text_or_ids)
    match = call(prefix_cache.lookup, token_ids)
    page_ids, num_cached = list(match.page_ids), int(match.num_tokens)
    if num_cached >= len(token_ids) and page_ids:  # keep the last token pending: it predicts the next one
        call(kv.free_pages, [page_ids.pop()])
        num_cached -= ctx.page_size
    _adopt(ctx, page_ids, num_cached)
    return num_cached


def publish_prefix(ctx: Context) -> int:
    """Offer this context's full pages to the engine's prefix cache (they become read-only).
    Call after generating (or flush() first). Returns the number of tokens published."""
    num_full = ctx.kv_len // ctx.page_size
    if num_full:
        call(prefix_cache.publish, ctx.token_ids[:num_full * ctx.page_size], ctx.page_ids[:num_full])
    return num_full * ctx.page_size


def export_context(ctx: Context, name: str) -> int:
    """Publish the context's full pages under a global name, with its tokens (in the tenant's store), so
    that another instance can continue from it with import_context. Returns the tokens exported."""
    ctx.flush()
    num_full = ctx.kv_len // ctx.page_size
    if not num_full:
        raise PieError(f"nothing to export: the context holds less than one full page ({ctx.page_size} tokens)")
    call(kv.export_pages, ctx.page_ids[:num_full], name)
    try:
        store_set(_EXPORT_KEY + name, json.dumps({"token_ids": ctx.token_ids, "num_pages": num_full}))
    except BaseException:
        call(kv.unexport_pages, name)
        raise
    return num_full * ctx.page_size


def import_context(name: str) -> Context:
    """A new context continuing the one exported under name (shared pages; no recompute of them)."""
    meta = store_get(_EXPORT_KEY + name)
    if meta is None:
        raise PieError(f"no context was exported as {name!r} through pie_sdk")
    state = json.loads(meta)
    page_ids = call(kv.import_pages, name)
    if len(page_ids) != state["num_pages"]:
        call(kv.free_pages, page_ids)
        raise PieError(f"export {name!r} holds {len(page_ids)} pages, its record says {state['num_pages']}")
    ctx = Context()
    ctx.fill(state["token_ids"])
    _adopt(ctx, page_ids, len(page_ids) * ctx.page_size)
    return ctx


def unexport_context(name: str) -> None:
    call(kv.unexport_pages, name)
    store_delete(_EXPORT_KEY + name)


def _require_empty(ctx: Context, what: str) -> None:
    if ctx.token_ids or ctx.page_ids:
        raise PieError(f"{what} needs an empty context (it reuses pages from position 0)")


def _adopt(ctx: Context, page_ids: list[int], num_cached: int) -> None:
    """Make the first num_cached tokens of ctx (all pending so far) cached in page_ids."""
    ctx.page_ids = page_ids
    ctx.kv_len = ctx.next_position = num_cached
    ctx.pending_ids = ctx.token_ids[num_cached:]

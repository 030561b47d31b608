"""Per-tenant quotas of one runtime: live instances per tenant, and KV pages held by all of a tenant's instances
together (`pie serve --tenant-max-instances`, `--tenant-max-pages`).

Instances are counted from launch to their end (Runtime._on_stop): a launch over the quota raises
TenantQuotaError, which the HTTP layer answers with 429.

Pages are counted as the per-instance quota counts them (engine/control/page_table.py): virtual pages, so a
forked, imported or prefix-cached page counts in every instance that maps it. QuotaControl wraps the runtime's
Control: it adds what allocate/share/import/prefix-lookup give an instance, subtracts what free_pages takes, and
drops an instance's count when it is closed. An allocation or a fork that would take the tenant over its quota
raises ControlError, which the inferlet gets as the call's error, as with the per-instance quota; imports and
prefix-cache hits are counted but never refused (they take no new physical page).

The counts are this runtime's: with several front-end processes each enforces its share (app/commands/serve.py).
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pie_server.engine.control.api import Control, ControlError, call_later
from pie_server.engine.types import InstanceId

# Calls that change how many pages an instance maps: (call arguments, result) -> the change.
_PAGE_CHANGES: dict[str, Callable[[tuple[Any, ...], Any], int]] = {
    "free_pages": lambda args, _result: -len(args[1]),
    "try_allocate_pages": lambda _args, result: len(result),
    "share_pages": lambda _args, result: len(result),
    "import_pages": lambda _args, result: len(result),
    "prefix_lookup": lambda _args, result: len(result[0]),
}
# Calls refused beforehand when they would take the tenant over: call arguments -> pages they add.
_PAGE_CHECKS: dict[str, Callable[[tuple[Any, ...]], int]] = {"share_pages": lambda args: len(args[1]),
                                                            "try_allocate_pages": lambda args: args[1]}
# Calls QuotaControl passes on as they are (bound once: the hot ones cost no extra lookup).
_PASSED_ON = ("forward", "decode", "stop_decode", "copy_slots", "mask_slots", "export_pages", "unexport_pages",
              "list_exports", "prefix_publish", "open_instance", "close_instance", "stats")


class TenantQuotaError(Exception):
    """A launch over the tenant's quota of live instances."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"this tenant already runs {limit} instances, its limit; wait for one to end")
        self.tenant = tenant
        self.limit = limit


class TenantInstances:
    """Live instances per tenant (thread-safe)."""

    def __init__(self, max_per_tenant: int | None) -> None:
        self.max_per_tenant = max_per_tenant
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        with self._lock:
            if self.max_per_tenant is not None and self._counts[tenant] >= self.max_per_tenant:
                raise TenantQuotaError(tenant, self.max_per_tenant)
            self._counts[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._counts[tenant] -= 1
            if self._counts[tenant] <= 0:
                del self._counts[tenant]

    def count(self, tenant: str) -> int:
        with self._lock:
            return self._counts[tenant]


@dataclass
class _Usage:
    tenant: str
    num_held: int = 0
    num_pending: int = 0  # asked for, not yet granted


class TenantPages:
    """KV pages mapped by each open instance, summed per tenant, with allocations in flight (thread-safe: the
    counts change in the scheduler thread and in the callbacks of the control layer's Futures)."""

    def __init__(self, max_per_tenant: int | None) -> None:
        self.max_per_tenant = max_per_tenant
        self._instances: dict[InstanceId, _Usage] = {}
        self._held: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def open(self, instance_id: InstanceId, tenant: str) -> None:
        with self._lock:
            self._instances[instance_id] = _Usage(tenant)

    def close(self, instance_id: InstanceId) -> None:
        """Its pages came back (close_instance), and its allocations in flight fail: none of them counts any
        more; late replies for it are ignored."""
        with self._lock:
            usage = self._instances.pop(instance_id, None)
            if usage is not None:
                self._held[usage.tenant] -= usage.num_held
                self._pending[usage.tenant] -= usage.num_pending

    def held(self, tenant: str) -> int:
        with self._lock:
            return self._held[tenant]

    def check(self, instance_id: InstanceId, num_new: int) -> None:
        """Raises ControlError unless num_new more pages fit the tenant's quota."""
        with self._lock:
            self._check(instance_id, num_new)

    def reserve(self, instance_id: InstanceId, num_new: int) -> None:
        """check, then count num_new as in flight until granted() says how the allocation ended."""
        with self._lock:
            usage = self._check(instance_id, num_new)
            if usage is not None:
                usage.num_pending += num_new
                self._pending[usage.tenant] += num_new

    def granted(self, instance_id: InstanceId, num_asked: int, num_granted: int) -> None:
        with self._lock:
            usage = self._instances.get(instance_id)
            if usage is None:
                return  # closed meanwhile: close() settled its counts, and close_instance freed the pages
            usage.num_pending -= num_asked
            self._pending[usage.tenant] -= num_asked
            self._change(usage, num_granted)

    def change(self, instance_id: InstanceId, num_pages: int) -> None:
        with self._lock:
            usage = self._instances.get(instance_id)
            if usage is not None:
                self._change(usage, num_pages)

    def _change(self, usage: _Usage, num_pages: int) -> None:
        usage.num_held += num_pages
        self._held[usage.tenant] += num_pages

    def _check(self, instance_id: InstanceId, num_new: int) -> _Usage | None:
        usage = self._instances.get(instance_id)
        if usage is None:
            return None  # not opened here (or closed): the control layer answers for it
        limit, held, pending = self.max_per_tenant, self._held[usage.tenant], self._pending[usage.tenant]
        if limit is not None and held + pending + num_new > limit:
            raise ControlError(f"the tenant's page quota is exceeded: its instances hold {held} pages"
                               + (f" (+{pending} being allocated)" if pending else "")
                               + f", asked for {num_new} more, its limit is {limit}")
        return usage


class QuotaControl:
    """The runtime's Control with every page an instance gets or gives back counted in TenantPages."""

    def __init__(self, inner: Control, pages: TenantPages) -> None:
        self._inner = inner
        self.pages = pages
        self.info = inner.info
        for name in _PASSED_ON:
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def __getattr__(self, name: str) -> Any:  # anything else of the wrapped Control (e.g. admission)
        return getattr(self._inner, name)

    def allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Future[Any]:
        self.pages.reserve(instance_id, num_pages)
        try:
            future = self._inner.allocate_pages(instance_id, num_pages)
        except BaseException:
            self.pages.granted(instance_id, num_pages, 0)
            raise
        future.add_done_callback(lambda done: self.pages.granted(
            instance_id, num_pages, 0 if done.cancelled() or done.exception() is not None else len(done.result())))
        return future

    def free_pages(self, instance_id: InstanceId, page_ids: Sequence[int]) -> None:
        self._now("free_pages", instance_id, page_ids)

    def try_allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Any:
        return self._now("try_allocate_pages", instance_id, num_pages)

    def share_pages(self, instance_id: InstanceId, page_ids: Sequence[int]) -> Any:
        return self._now("share_pages", instance_id, page_ids)

    def import_pages(self, instance_id: InstanceId, name: str) -> Any:
        return self._now("import_pages", instance_id, name)

    def prefix_lookup(self, instance_id: InstanceId, token_ids: Sequence[int]) -> Any:
        return self._now("prefix_lookup", instance_id, token_ids)

    def call_later(self, method: str, *args: Any) -> Future[Any]:
        """engine/control/api.py call_later through the wrapped Control, counted when it settles."""
        if method in _PAGE_CHECKS:
            self.pages.check(args[0], _PAGE_CHECKS[method](args))
        future = call_later(self._inner, method, *args)
        if method in _PAGE_CHANGES:
            future.add_done_callback(lambda done: self._settled(method, args, done))
        return future

    def _now(self, method: str, *args: Any) -> Any:
        if method in _PAGE_CHECKS:
            self.pages.check(args[0], _PAGE_CHECKS[method](args))
        result = getattr(self._inner, method)(*args)
        self.pages.change(args[0], _PAGE_CHANGES[method](args, result))
        return result

    def _settled(self, method: str, args: tuple[Any, ...], done: Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            self.pages.change(args[0], _PAGE_CHANGES[method](args, done.result()))

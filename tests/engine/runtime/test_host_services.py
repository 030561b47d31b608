"""Host-side services behind the small interfaces: HTTP allow-list, tenant store, broadcast bus."""
from __future__ import annotations

import pytest

from pie_server.engine.runtime.api_http import host_allowed
from pie_server.engine.runtime.host import BroadcastBus, TenantStore
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.types import InstanceId


def test_http_allow_list_matches_exact_hosts_and_subdomain_patterns() -> None:
    allowed = ("api.example.com", "*.tools.dev")
    assert host_allowed("api.example.com", allowed) and host_allowed("API.Example.com.", allowed)
    assert host_allowed("a.b.tools.dev", allowed)
    assert not host_allowed("tools.dev", allowed)  # the pattern covers subdomains only
    assert not host_allowed("evil-api.example.com", allowed) and not host_allowed("example.com", allowed)
    assert not host_allowed("api.example.com.evil.net", allowed)
    assert not host_allowed("anything", ())


def test_tenant_store_isolates_tenants_and_enforces_its_quota() -> None:
    store = TenantStore(max_bytes_per_tenant=20)
    store.set("a", "k1", "v" * 10)
    assert store.get("a", "k1") == "v" * 10 and store.get("b", "k1") is None
    with pytest.raises(ValueError, match="full"):
        store.set("a", "k2", "w" * 10)
    store.set("a", "k1", "x")  # replacing frees the old value's bytes
    store.set("a", "k2", "w" * 10)
    assert store.keys("a", "k") == ["k1", "k2"] and store.keys("b", "") == []
    assert store.delete("a", "k1") and not store.delete("a", "k1")


def _instance(name: str) -> InstanceState:
    return InstanceState(id=InstanceId(name), program_hash="", arguments=(), tenant="t", deadline=0.0)


def test_broadcast_reaches_other_subscribers_only() -> None:
    bus, sender, listener, other = BroadcastBus(), _instance("s"), _instance("l"), _instance("o")
    bus.subscribe(sender, "news")
    bus.subscribe(listener, "news")
    bus.subscribe(other, "sports")
    assert bus.publish(sender, "news", "hi") == 1
    assert listener.broadcasts.try_get() == ("news", "hi")
    assert sender.broadcasts.try_get() is None and other.broadcasts.try_get() is None
    bus.drop(listener)
    assert bus.publish(sender, "news", "again") == 0 and listener.topics == set()

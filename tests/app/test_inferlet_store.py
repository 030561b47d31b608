"""app/inferlet_store.py: records per tenant and name over content-addressed Wasm bytes on disk."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pie_server.app.inferlet_store import InferletStore, StoreError


def test_names_ids_tenants_and_deletion(tmp_path: Path) -> None:
    store = InferletStore(tmp_path)
    a = store.put(b"bytes-a", "alpha", "t1")
    assert a.id == hashlib.sha256(b"bytes-a").hexdigest() and a.size == 7
    assert store.put(b"bytes-a", "alias", "t1").id == a.id  # same bytes, same id, another name
    assert store.get("alpha", "t1").id == a.id and store.get(a.id, "t1").id == a.id
    assert store.wasm(a) == b"bytes-a"
    b = store.put(b"bytes-b", "alpha", "t1")  # the name now points to new bytes
    assert store.get("alpha", "t1").id == b.id and store.get("alias", "t1").id == a.id
    with pytest.raises(StoreError) as missing:
        store.get("alpha", "t2")  # another tenant sees none of it
    assert missing.value.status == 404 and store.list("t2") == []
    store.put(b"bytes-a", "theirs", "t2")
    assert [r.name for r in store.delete("alias", "t1")] == ["alias"]
    assert store.wasm(a) == b"bytes-a"  # t2 still names these bytes
    store.delete(a.id, "t2")
    assert not (tmp_path / "wasm" / f"{a.id}.wasm").exists()
    assert [r.name for r in store.list("t1")] == ["alpha"]


def test_bad_names_are_refused(tmp_path: Path) -> None:
    store = InferletStore(tmp_path)
    for name in ("", "../x", "a b", "x" * 65, ".hidden"):
        with pytest.raises(StoreError):
            store.put(b"w", name, "t")
    assert store.list("t") == []


def test_builtin_inferlets_are_everyones_and_shadowed_by_a_tenants_own(tmp_path: Path) -> None:
    from pie_server.app.inferlet_store import BUILTIN_TENANT

    store = InferletStore(tmp_path)
    builtin = store.put(b"server's", "default", BUILTIN_TENANT)
    assert store.get("default", "t1") == builtin and store.get(builtin.id, "t2") == builtin
    assert [r.public()["builtin"] for r in store.list("t1")] == [True]
    own = store.put(b"t1's", "default", "t1")  # shadows the built-in one, for t1 only
    assert store.get("default", "t1") == own and store.get("default", "t2") == builtin
    assert [r.id for r in store.list("t1")] == [own.id] and [r.id for r in store.list("t2")] == [builtin.id]
    assert store.delete("default", "t1") == [own]  # t1's own goes; the built-in one is seen again
    with pytest.raises(StoreError) as refused:
        store.delete("default", "t1")
    assert refused.value.status == 403 and store.get("default", "t1") == builtin

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

"""app/inferlet_store.py: records per tenant and name over content-addressed Wasm bytes on disk; the built-in
namespace, the reserved name `default`, and an old store's record of it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pie_server.app.inferlet_store import BUILTIN_TENANT, RESERVED_NAMES, InferletStore, StoreError


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
    store = InferletStore(tmp_path)
    builtin = store.put(b"server's", "beam-search", BUILTIN_TENANT)
    assert store.get("beam-search", "t1") == builtin and store.get(builtin.id, "t2") == builtin
    assert [r.public()["builtin"] for r in store.list("t1")] == [True]
    own = store.put(b"t1's", "beam-search", "t1")  # shadows the built-in example, for t1 only
    assert store.get("beam-search", "t1") == own and store.get("beam-search", "t2") == builtin
    assert [r.id for r in store.list("t1")] == [own.id] and [r.id for r in store.list("t2")] == [builtin.id]
    assert store.delete("beam-search", "t1") == [own]  # t1's own goes; the built-in one is seen again
    with pytest.raises(StoreError) as refused:
        store.delete("beam-search", "t1")
    assert refused.value.status == 403 and store.get("beam-search", "t1") == builtin


def test_the_default_inferlets_name_is_the_servers_alone(tmp_path: Path) -> None:
    store = InferletStore(tmp_path)
    builtin = store.put(b"the server's default", "default", BUILTIN_TENANT)
    for name in RESERVED_NAMES:
        with pytest.raises(StoreError) as refused:
            store.put(b"t1's", name, "t1")
        assert refused.value.status == 409 and "another name" in str(refused.value)
    assert store.get("default", "t1") == builtin and store.list("t1") == [builtin]


def test_an_old_stores_record_named_default_no_longer_shadows_the_builtin_one(tmp_path: Path) -> None:
    """Earlier versions kept the server's copy of the default inferlet as tenant openai's upload "default"
    (records/<hash of the tenant>/default.json, the same layout): opening the store renames it, bytes kept."""
    import json

    from pie_server.app.inferlet_store import _tenant_dir

    old_wasm = b"the default inferlet as an old version built it"
    old_id = hashlib.sha256(old_wasm).hexdigest()
    (tmp_path / "wasm").mkdir()
    (tmp_path / "wasm" / f"{old_id}.wasm").write_bytes(old_wasm)
    folder = tmp_path / "records" / _tenant_dir("openai")
    folder.mkdir(parents=True)
    (folder / "default.json").write_text(json.dumps({"id": old_id, "name": "default", "size": len(old_wasm),
                                                     "created": 1700000000, "tenant": "openai"}))
    store = InferletStore(tmp_path)
    builtin = store.put(b"the default inferlet of this version", "default", BUILTIN_TENANT)
    assert store.find("default", "openai") is None and store.get("default", "openai") == builtin
    renamed = store.get(f"default.legacy-{old_id[:8]}", "openai")
    assert renamed.id == old_id and renamed.tenant == "openai" and store.wasm(renamed) == old_wasm
    assert store.get(old_id, "openai") == renamed  # by id too
    listed = {r.name: r.public()["builtin"] for r in store.list("openai")}
    assert listed == {"default": True, renamed.name: False}
    assert InferletStore(tmp_path).list("openai") == store.list("openai")  # opening it again changes nothing

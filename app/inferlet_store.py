"""Uploaded inferlets on disk (`/v1/inferlets`): the Wasm bytes under their sha256, and a small JSON record beside
each (name, size, created, tenant). On disk so that uploads survive restarts and every front-end process sees
the same ones (a volume in compose); compiled code is cached apart, by the runtime (engine/runtime/programs.py).

Names: a record per tenant and name, pointing to the bytes last uploaded under that name. Uploading the same
bytes again returns the same id, under every name it was given. The bytes go when no record names them (deleted,
or the name now points to other bytes). Writes go to a temporary file first and are renamed into place, so a
reader never sees half a file.

Tenants see only their own records, and the built-in ones: the server's own inferlets (the default inferlet, the
preinstalled contrib ones: app/preinstalled.py) live in the namespace BUILTIN_TENANT, which only the server
writes; a name resolves in the tenant's own records first, then there (so a tenant's upload named after a
preinstalled example shadows it for that tenant only). A tenant cannot delete a built-in inferlet (403).

Reserved names (RESERVED_NAMES: `default`, the program behind the OpenAI routes) are the server's alone, as a
served model name is in vLLM: an upload under one is refused (409), and a tenant's record of one never resolves.
Earlier versions kept the server's copy of the default inferlet as an upload of tenant `openai`; opening the
store renames every such record to `default.legacy-<first 8 hex digits of its id>` (its bytes stay, reachable by
that name and by id), so the built-in default wins and nothing a user uploaded is lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection

log = logging.getLogger("pie.app")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
BUILTIN_TENANT = "@builtin"  # no tenant is named so (app/config.py TENANT_PATTERN has no '@')
RESERVED_NAMES = frozenset({"default"})  # app/state.py DEFAULT_INFERLET_NAME
LEGACY_SUFFIX = ".legacy-"


class StoreError(Exception):
    """A request the store refuses (bad name, unknown inferlet); status is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferletRecord:
    id: str  # sha256 of the Wasm bytes
    name: str
    size: int
    created: int  # unix seconds of the latest upload
    tenant: str

    def public(self) -> dict[str, object]:
        return {"object": "inferlet", "id": self.id, "name": self.name, "size": self.size, "created": self.created,
                "builtin": self.tenant == BUILTIN_TENANT, "status": "ready"}


class InferletStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rename_reserved_records()

    def check_name(self, name: str, tenant: str) -> None:
        """StoreError unless tenant may upload under name: 400 for a malformed one, 409 for a reserved one."""
        if not NAME_PATTERN.match(name):
            raise StoreError("name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")
        if name in RESERVED_NAMES and tenant != BUILTIN_TENANT:
            raise StoreError(f"{name!r} is the server's built-in inferlet and cannot be replaced; upload under "
                             "another name", 409)

    def put(self, wasm: bytes, name: str, tenant: str) -> InferletRecord:
        self.check_name(name, tenant)
        record = InferletRecord(hashlib.sha256(wasm).hexdigest(), name, len(wasm), int(time.time()), tenant)
        with self._lock:
            if not self._wasm_path(record.id).is_file():
                _write_atomically(self._wasm_path(record.id), wasm)
            replaced = _read_record(self._record_path(tenant, name))
            _write_atomically(self._record_path(tenant, name), json.dumps(asdict(record)).encode())
            if replaced is not None and replaced.id != record.id:
                self._drop_if_unnamed(replaced.id)
        return record

    def find(self, id_or_name: str, tenant: str) -> InferletRecord | None:
        """The tenant's own record by name or id (no built-in one), or None."""
        return self._find(id_or_name, tenant)

    def get(self, id_or_name: str, tenant: str) -> InferletRecord:
        """By name, or by id (its newest name): the tenant's own, else a built-in one."""
        for owner in dict.fromkeys((tenant, BUILTIN_TENANT)):
            record = self._find(id_or_name, owner)
            if record is not None:
                return record
        raise StoreError(f"no inferlet {id_or_name!r}", 404)

    def list(self, tenant: str) -> list[InferletRecord]:
        """The tenant's records and the built-in ones it does not shadow by name."""
        own = self._records(tenant)
        names = {r.name for r in own}
        builtin = [] if tenant == BUILTIN_TENANT else [r for r in self._records(BUILTIN_TENANT) if r.name not in names]
        return sorted(own + builtin, key=lambda r: (r.created, r.id))

    def wasm(self, record: InferletRecord) -> bytes:
        return self._wasm_path(record.id).read_bytes()

    def delete(self, id_or_name: str, tenant: str) -> list[InferletRecord]:
        """Removes the tenant's record of that name, or every name of that id; the bytes go once no record
        (of any tenant) names them. 403 for a built-in inferlet, 404 for an unknown one."""
        with self._lock:
            first = self._find(id_or_name, tenant)
            if first is None:
                if tenant != BUILTIN_TENANT and self._find(id_or_name, BUILTIN_TENANT) is not None:
                    raise StoreError(f"{id_or_name!r} is a built-in inferlet: it cannot be deleted", 403)
                raise StoreError(f"no inferlet {id_or_name!r}", 404)
            records = [first] if first.name == id_or_name else [r for r in self._records(tenant) if r.id == first.id]
            for record in records:
                self._record_path(tenant, record.name).unlink(missing_ok=True)
            self._drop_if_unnamed(first.id)
        return records

    def retain(self, tenant: str, names: Collection[str]) -> None:
        """Removes the tenant's records of other names (the server's built-in namespace keeps only the inferlets
        this version ships: a contrib folder that went is no longer offered)."""
        with self._lock:
            for record in self._records(tenant):
                if record.name not in names:
                    self._record_path(tenant, record.name).unlink(missing_ok=True)
                    self._drop_if_unnamed(record.id)

    def _rename_reserved_records(self) -> None:
        """Every tenant's record of a reserved name (only earlier versions wrote them) is renamed, keeping its
        bytes: several processes may open the store at once, so each step is idempotent (the new name depends
        only on the record, and the old record's removal tolerates another's)."""
        builtin_dir = _tenant_dir(BUILTIN_TENANT)
        with self._lock:
            for name in sorted(RESERVED_NAMES):
                for path in (self.root / "records").glob(f"*/{name}.json"):
                    record = _read_record(path)
                    if path.parent.name == builtin_dir or record is None:
                        continue
                    renamed = dataclasses.replace(record, name=f"{name}{LEGACY_SUFFIX}{record.id[:8]}")
                    _write_atomically(path.parent / f"{renamed.name}.json", json.dumps(asdict(renamed)).encode())
                    path.unlink(missing_ok=True)
                    log.warning("the upload %r of tenant %r is now named %r: %r is the built-in inferlet's name",
                                name, record.tenant, renamed.name, name)

    def _drop_if_unnamed(self, inferlet_id: str) -> None:
        """Removes the bytes once no record of any tenant names them (the caller holds the lock)."""
        if not any(r.id == inferlet_id for r in map(_read_record, (self.root / "records").glob("*/*.json")) if r):
            self._wasm_path(inferlet_id).unlink(missing_ok=True)

    def _find(self, id_or_name: str, tenant: str) -> InferletRecord | None:
        if id_or_name in RESERVED_NAMES and tenant != BUILTIN_TENANT:
            return None  # the server's name, whatever a tenant's folder holds (a record an old version wrote)
        if NAME_PATTERN.match(id_or_name):
            record = _read_record(self._record_path(tenant, id_or_name))
            if record is not None:
                return record
        with_id = [r for r in self._records(tenant) if r.id == id_or_name] if ID_PATTERN.match(id_or_name) else []
        return max(with_id, key=lambda r: r.created) if with_id else None

    def _records(self, tenant: str) -> list[InferletRecord]:
        """The tenant's records (for a tenant, none of a reserved name: see _find)."""
        folder = self.root / "records" / _tenant_dir(tenant)
        records = [r for r in map(_read_record, folder.glob("*.json")) if r is not None] if folder.is_dir() else []
        return records if tenant == BUILTIN_TENANT else [r for r in records if r.name not in RESERVED_NAMES]

    def _wasm_path(self, inferlet_id: str) -> Path:
        return self.root / "wasm" / f"{inferlet_id}.wasm"

    def _record_path(self, tenant: str, name: str) -> Path:
        return self.root / "records" / _tenant_dir(tenant) / f"{name}.json"


def _tenant_dir(tenant: str) -> str:
    """A tenant's folder name: a hash, so no tenant string can name a path."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:32]


def _read_record(path: Path) -> InferletRecord | None:
    """None if there is none (or it went meanwhile: another process deleted it)."""
    try:
        return InferletRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""The contrib inferlets (inferlets/contrib/NAME/), preinstalled for every tenant under their folder names.

Which: every folder of inferlets/contrib/ with a main.py and a valid inferlet name, found when the server starts
(a folder added later is offered after a restart). Built on first use, never at start: a build takes 10-20 s of
CPU (componentize-py) and the server must answer /health without waiting for any. A build is cached on disk by
the hash of its sources (app/inferlet_build.py), so a restart or another front-end process finds it there (two
processes that build at once each write their own file and rename it into place); within a process one build per
name runs at a time, and every request that needs it waits for that one. A request that goes away does not
cancel the build.

A built inferlet is stored like the default one, in the store's built-in namespace (app/inferlet_store.py): a
tenant's own upload of the same name shadows it for that tenant only, and nobody can delete it.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Collection, Mapping

from pie_server.app.inferlet_build import FOLDER_ENTRY, BuildError, build_inferlet, is_cached
from pie_server.app.inferlet_store import BUILTIN_TENANT, NAME_PATTERN, InferletRecord, InferletStore

log = logging.getLogger("pie.app")

# What /v1/inferlets says of a preinstalled inferlet: built (it has an id), not built yet, being built, or its
# last build failed (it is tried again on the next use).
STATUS_READY, STATUS_NOT_BUILT, STATUS_BUILDING, STATUS_FAILED = "ready", "not_built", "building", "failed"


def discover(contrib_dir: Path, reserved: Collection[str] = ()) -> dict[str, Path]:
    """name -> folder for every folder of contrib_dir that is a Python inferlet (has main.py), sorted by name.
    A folder whose name is no valid inferlet name, or a reserved one (the default inferlet's), is skipped."""
    if not contrib_dir.is_dir():
        return {}
    found: dict[str, Path] = {}
    for folder in sorted(p for p in contrib_dir.iterdir() if p.is_dir()):
        if not (folder / FOLDER_ENTRY).is_file():
            continue  # not a Python inferlet (a README, another language's example)
        if not NAME_PATTERN.match(folder.name) or folder.name in reserved:
            log.warning("%s is not preinstalled: its folder name cannot be an inferlet's name", folder)
            continue
        found[folder.name] = folder
    return found


class PreinstalledInferlets:
    """The preinstalled inferlets of one front-end process (asyncio: use it from the server's event loop)."""

    def __init__(self, store: InferletStore, sources: Mapping[str, Path], build_cache_dir: Path | None = None) -> None:
        self.store = store
        self.sources = dict(sources)
        self._cache_dir = build_cache_dir  # None: $PIE_CACHE_DIR/inferlets
        self._records: dict[str, InferletRecord] = {}  # built (or found built) by this process
        self._builds: dict[str, asyncio.Future[InferletRecord]] = {}  # in progress
        self._errors: dict[str, str] = {}  # the last failed build's message, until a build succeeds

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.sources)

    async def ensure(self, name: str) -> InferletRecord:
        """The built inferlet (stored in the built-in namespace); built now if it is not yet. BuildError (or
        OSError) when the build fails."""
        record = self._records.get(name)
        if record is not None:
            return record
        build = self._builds.get(name)
        if build is None:
            build = asyncio.ensure_future(asyncio.to_thread(self._build, name))
            self._builds[name] = build
            build.add_done_callback(lambda done: self._finished(name, done))
        return await asyncio.shield(build)  # a waiter that is cancelled leaves the build running for the others

    async def adopt_built(self, names: Collection[str] | None = None) -> None:
        """Takes over, without building, those already built elsewhere (another front-end process, an earlier
        start: the build cache has them). Cheap: the sources are hashed, a cached component is copied."""
        for name in sorted(self.names if names is None else self.names & set(names)):
            if name in self._records or name in self._builds:
                continue
            if await asyncio.to_thread(self._is_cached, name):
                try:
                    await self.ensure(name)
                except (BuildError, OSError):
                    pass  # reported by entry() as failed

    def entry(self, name: str) -> dict[str, Any]:
        """What /v1/inferlets says of it: its record once built, else its name and status (no id: the id is
        the hash of the built bytes)."""
        record = self._records.get(name)
        if record is not None:
            return record.public()
        status = STATUS_BUILDING if name in self._builds else STATUS_FAILED if name in self._errors \
            else STATUS_NOT_BUILT
        entry: dict[str, Any] = {"object": "inferlet", "id": None, "name": name, "size": None, "created": None,
                                 "builtin": True, "status": status}
        if status == STATUS_FAILED:
            entry["error"] = self._errors[name]
        return entry

    def _build(self, name: str) -> InferletRecord:
        """In a worker thread: build (or copy from the build cache) and store in the built-in namespace."""
        log.info("preparing the preinstalled inferlet %r (a build takes 10-20 s the first time; cached)", name)
        with tempfile.TemporaryDirectory(prefix="pie-preinstalled-") as tmp:
            out = build_inferlet(self.sources[name], Path(tmp) / f"{name}.wasm", self._cache_dir, progress=False)
            wasm = out.read_bytes()
        existing = self.store.find(name, BUILTIN_TENANT)
        if existing is not None and existing.id == hashlib.sha256(wasm).hexdigest():
            return existing  # stored by another process or an earlier start: keep its record as it is
        return self.store.put(wasm, name, BUILTIN_TENANT)

    def _finished(self, name: str, build: asyncio.Future[InferletRecord]) -> None:
        self._builds.pop(name, None)
        if build.cancelled():
            return
        error = build.exception()
        if error is None:
            self._records[name] = build.result()
            self._errors.pop(name, None)
        else:
            log.error("the preinstalled inferlet %r could not be built: %s", name, error)
            self._errors[name] = str(error)

    def _is_cached(self, name: str) -> bool:
        try:
            return is_cached(self.sources[name], self._cache_dir)
        except (BuildError, OSError):  # a source that cannot be built (yet): its use will say why
            return False

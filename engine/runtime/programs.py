"""Compiled components, cached by content hash: on disk through Component.serialize/deserialize_file (an
artifact is keyed by the component's sha256 and the engine settings), and in memory, mapped from those files.

The disk cache is bounded (RuntimeConfig.compile_cache_bytes; a componentize-py inferlet compiles to about
40 MB): after every write, the least recently used artifacts go until the rest fit. "Used" is the file's
mtime, set on every load and launch, so several processes (front ends, restarts) sharing the folder agree on
the order without talking to each other. The newest artifact always stays, even alone over the bound.

Why eviction is safe while instances run: a component in memory is the artifact's file mapped (mmap), and
removing a file does not disturb a mapping of it (POSIX keeps the file until the last mapping goes); files are
only ever replaced by a rename, never rewritten in place. A process drops from memory what it evicts, and what
it finds evicted by another when it touches it, so the mapped files too stay within the bound; a later launch of
such a program raises KeyError, and its caller loads the Wasm again (app/state.py does). Concurrent writers and
evicters may race: a file that vanishes between listing and use is a miss, never an error.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import wasmtime
from wasmtime.component import Component, FuncType

ARTIFACT_SUFFIX = ".cwasm"
# The inferlet world (inferlets/wit): a component exports the function `run` and imports only WASI and
# pie:inferlet interfaces; any other component could never be instantiated by the runtime's linker.
WORLD_IMPORT_PREFIXES = ("wasi:", "pie:inferlet/")
_CORE_MODULE_HEADER = b"\0asm\x01\0\0\0"  # magic, version 1, layer 0 (a component's layer is 1)
STALE_TEMP_S = 3600.0  # a temporary file this old is left over from a crashed writer


class ProgramCache:
    def __init__(self, engine: wasmtime.Engine, cache_dir: Path, engine_key: str,
                 max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_bytes must be positive (or None: unbounded)")
        self._engine = engine
        self._dir = cache_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._engine_key = hashlib.sha256(engine_key.encode()).hexdigest()[:16]
        self.max_bytes = max_bytes
        self._components: dict[str, Component] = {}
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations done (a cache miss each)
        self.num_disk_hits = 0
        self.num_evicted = 0  # artifacts this process removed to keep the bound
        self._evict()  # the bound may have been lowered since the folder was filled

    def load(self, wasm: bytes) -> str:
        """Compile (or find) a component; returns its program hash. Raises ValueError on invalid wasm."""
        program_hash = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            in_memory = self._components.get(program_hash)
        if in_memory is not None:
            if not _touch(self.artifact_path(program_hash)):  # evicted by another process: write it back
                saved = self._save(program_hash, in_memory)
                with self._lock:  # the new file's mapping replaces the removed one's (whose blocks it held)
                    self._components[program_hash] = saved
            return program_hash
        self._store(program_hash, self._from_disk(program_hash) or self._compile(program_hash, wasm))
        return program_hash

    def get(self, program_hash: str) -> Component:
        """The loaded component; KeyError if it never was, or was evicted meanwhile (load it again)."""
        component = self._in_memory(program_hash)
        if component is not None:
            return component
        component = self._from_disk(program_hash)
        if component is None:
            raise KeyError(f"unknown program {program_hash}: load it first")
        return self._store(program_hash, component)

    def artifact_path(self, program_hash: str) -> Path:
        return self._dir / f"{program_hash}-{self._engine_key}{ARTIFACT_SUFFIX}"

    def _store(self, program_hash: str, component: Component) -> Component:
        with self._lock:
            return self._components.setdefault(program_hash, component)

    def _in_memory(self, program_hash: str) -> Component | None:
        """The component in memory, marked used on disk; one whose file another process evicted is returned
        this once and dropped, so that this process does not keep it mapped past the bound (a launch must not
        wait for it to be written back: load() does that)."""
        with self._lock:
            component = self._components.get(program_hash)
        if component is not None and not _touch(self.artifact_path(program_hash)):
            with self._lock:
                self._components.pop(program_hash, None)
        return component

    def _from_disk(self, program_hash: str) -> Component | None:
        path = self.artifact_path(program_hash)
        if not _touch(path):
            return None
        try:
            component = Component.deserialize_file(self._engine, str(path))
        except wasmtime.WasmtimeError:
            if path.exists():
                path.unlink(missing_ok=True)  # stale or corrupt: compile again
            return None
        self.num_disk_hits += 1
        return component

    def _compile(self, program_hash: str, wasm: bytes) -> Component:
        try:
            component = Component(self._engine, wasm)
        except wasmtime.WasmtimeError as error:
            if wasm.startswith(_CORE_MODULE_HEADER):
                raise ValueError("a core WebAssembly module, not a component: build inferlets with `pie build` "
                                 "(componentize-py) or wrap a module with `wasm-tools component new`") from None
            raise ValueError(f"not a valid WebAssembly component: {str(error).splitlines()[0]}") from None
        check_world(self._engine, component)
        self.num_compiled += 1
        return self._save(program_hash, component)

    def _save(self, program_hash: str, component: Component) -> Component:
        """Writes the artifact (atomically), keeps the bound, and returns the component mapped from the file
        instead of the compiler's memory (the kernel may then page it out)."""
        path = self.artifact_path(program_hash)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(component.serialize())
        os.replace(tmp, path)
        _touch(path)
        self._evict(keep=path)
        try:
            return Component.deserialize_file(self._engine, str(path))
        except wasmtime.WasmtimeError:  # gone already (another process's eviction): this one serves
            return component

    def _evict(self, keep: Path | None = None) -> None:
        """Removes the least recently used artifacts (any engine key: stale ones are old) until the rest fit
        max_bytes; never keep; also temporary files left over by crashed writers."""
        if self.max_bytes is None:
            return
        artifacts = []
        for path in self._dir.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed meanwhile by another process
            if path.name.endswith(ARTIFACT_SUFFIX):
                artifacts.append((stat.st_mtime_ns, stat.st_size, path))
            elif ".tmp" in path.name and time.time() - stat.st_mtime > STALE_TEMP_S:
                path.unlink(missing_ok=True)
        total = sum(size for _, size, _ in artifacts)
        for _, size, path in sorted(artifacts):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            self.num_evicted += 1
            with self._lock:
                self._components.pop(path.name.split("-", 1)[0], None)


def check_world(engine: wasmtime.Engine, component: Component) -> None:
    """ValueError unless the component is of the inferlet world (checked once, before it is cached)."""
    kind = component.type
    foreign = sorted(name for name in kind.imports(engine) if not name.startswith(WORLD_IMPORT_PREFIXES))
    if foreign:
        raise ValueError(f"not a component of the pie:inferlet world: it imports {', '.join(foreign[:3])}, which "
                         "this host does not provide")
    run = kind.exports(engine).get("run")
    if run is None or not isinstance(run.ty, FuncType):
        raise ValueError("not a component of the pie:inferlet world: it does not export the function `run`")


def _touch(path: Path) -> bool:
    """Marks the file used now (its mtime: the LRU order); False if it does not exist. The time is given
    (nanoseconds), not left to the kernel, whose file times advance only once per clock tick."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        return False
    return True

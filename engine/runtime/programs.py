"""Compiled components, cached by content hash: in memory, and on disk through
Component.serialize/deserialize (an artifact is keyed by the component's sha256 and the engine settings)."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import wasmtime
from wasmtime.component import Component


class ProgramCache:
    def __init__(self, engine: wasmtime.Engine, cache_dir: Path, engine_key: str) -> None:
        self._engine = engine
        self._dir = cache_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._engine_key = hashlib.sha256(engine_key.encode()).hexdigest()[:16]
        self._components: dict[str, Component] = {}
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations done (a cache miss each)
        self.num_disk_hits = 0

    def load(self, wasm: bytes) -> str:
        """Compile (or find) a component; returns its program hash. Raises ValueError on invalid wasm."""
        program_hash = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            if program_hash in self._components:
                return program_hash
        component = self._from_disk(program_hash) or self._compile(program_hash, wasm)
        with self._lock:
            self._components.setdefault(program_hash, component)
        return program_hash

    def get(self, program_hash: str) -> Component:
        with self._lock:
            component = self._components.get(program_hash)
        if component is None:
            component = self._from_disk(program_hash)
            if component is None:
                raise KeyError(f"unknown program {program_hash}: load it first")
            with self._lock:
                self._components.setdefault(program_hash, component)
        return component

    def artifact_path(self, program_hash: str) -> Path:
        return self._dir / f"{program_hash}-{self._engine_key}.cwasm"

    def _from_disk(self, program_hash: str) -> Component | None:
        path = self.artifact_path(program_hash)
        if not path.exists():
            return None
        try:
            component = Component.deserialize_file(self._engine, str(path))
        except wasmtime.WasmtimeError:
            path.unlink(missing_ok=True)  # stale or corrupt: compile again
            return None
        self.num_disk_hits += 1
        return component

    def _compile(self, program_hash: str, wasm: bytes) -> Component:
        try:
            component = Component(self._engine, wasm)
        except wasmtime.WasmtimeError as error:
            raise ValueError(f"not a valid WebAssembly component: {str(error).splitlines()[0]}") from None
        self.num_compiled += 1
        path = self.artifact_path(program_hash)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(component.serialize())
        os.replace(tmp, path)
        return component

"""Starting the engine core in a process of its own, and finding it from a front end.

The core is spawned (not forked: CUDA and threads do not survive a fork) with a CoreSpec; it loads the
model, builds the executor and the Controller, and serves them at `ipc://<run_dir>/core`. A front end finds
it through a CoreAddress, which the server hands to its front-end processes in the environment.
If loading fails, the core writes the error to `<run_dir>/error` before it exits, for the front ends to show.
The pid of the core running now is in `<run_dir>/core.pid` (a restarted core has another: supervisor.py).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path

from pie_server.engine.config import EngineConfig
from pie_server.engine.gil import CORE_SWITCH_INTERVAL_S, set_server_switch_interval

ENV_VAR = "PIE_ENGINE_CORE"
PID_FILE = "core.pid"


@dataclass(frozen=True)
class CoreSpec:
    model: str | None  # a model folder or .gguf; None: the embedded default
    config: EngineConfig
    run_dir: str  # sockets and the error file; the server owns it
    model_name: str | None = None
    log_level: str = "INFO"


@dataclass(frozen=True)
class CoreAddress:
    address: str
    pid: int
    run_dir: str

    def to_env(self) -> str:
        return json.dumps({"address": self.address, "pid": self.pid, "run_dir": self.run_dir})

    @classmethod
    def from_env(cls, value: str | None = None) -> "CoreAddress":
        data = json.loads(value if value is not None else os.environ[ENV_VAR])
        return cls(str(data["address"]), int(data["pid"]), str(data["run_dir"]))

    def current(self) -> "CoreAddress":
        """This address with the pid of the core running now (start_core writes it)."""
        try:
            return CoreAddress(self.address, int((Path(self.run_dir) / PID_FILE).read_text()), self.run_dir)
        except (OSError, ValueError):
            return self

    def load_error(self) -> str | None:
        path = Path(self.run_dir) / "error"
        return path.read_text() if path.is_file() else None


def core_address_of(run_dir: str) -> str:
    return f"ipc://{Path(run_dir) / 'core'}"


def start_core(spec: CoreSpec) -> tuple[multiprocessing.process.BaseProcess, CoreAddress]:
    """Spawns the core; it answers front ends once its model is loaded (their calls queue until then)."""
    process = multiprocessing.get_context("spawn").Process(target=run_core, args=(spec,), name="pie-engine-core")
    (Path(spec.run_dir) / "error").unlink(missing_ok=True)  # an earlier core's
    process.start()
    assert process.pid is not None
    pid_file = Path(spec.run_dir) / PID_FILE
    pid_file.with_suffix(".tmp").write_text(str(process.pid))
    pid_file.with_suffix(".tmp").replace(pid_file)  # front ends never read half a pid
    return process, CoreAddress(core_address_of(spec.run_dir), process.pid, spec.run_dir)


def run_core(spec: CoreSpec) -> None:
    """The core process's main: load, then serve until the process that started it is gone."""
    # Ctrl-C reaches the whole process group: the serving process stops the core once its front ends drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_server_switch_interval(CORE_SWITCH_INTERVAL_S)
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    from pie_server.engine.core.server import EngineCore
    from pie_server.engine.engine import start_core_parts

    try:
        control, facts = start_core_parts(spec.model, spec.config, spec.model_name)
        core = EngineCore(control, facts, core_address_of(spec.run_dir))
    except BaseException as exc:
        (Path(spec.run_dir) / "error").write_text(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        raise SystemExit(1) from None
    logging.getLogger(__name__).info("engine core (process %d) ready at %s", os.getpid(),
                                     core_address_of(spec.run_dir))
    try:
        core.serve_forever()
    finally:
        control.stop()
        core.close()

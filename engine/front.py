"""A front end's engine: the Wasm runtime and the tokenizer here, the control layer and the executor in the
engine core's process (engine/core), reached through RemoteControl. It has the attributes of Engine that the
app uses (model_name, info, tokenizer, vocab_size, control, runtime, alive, close), so the app cannot tell
them apart."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pie_server.engine.config import EngineInfo
from pie_server.engine.core.client import CoreGone, RemoteControl
from pie_server.engine.core.process import CoreAddress
from pie_server.engine.engine import model_info, with_decode_choice
from pie_server.engine.gc_pauses import freeze_heap
from pie_server.engine.processes import is_alive
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.engine.runtime.runtime import Runtime
from pie_server.engine.runtime.tokenizer import EngineTokenizerAdapter
from pie_server.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A decode's first room (RuntimeConfig.decode_room_pages): it gets its next one when it has used half of it, 64 tokens
# at page size 16 (each next room as large as what it generated, engine/runtime/decode_room.py), many steps' time
# for the allocation's round trip to the core; a 128-token answer needs none. 8 rather than 4 (until 2026-12-07):
# fewer top-ups for the core to serve between its steps (2-core CPU, emulated 1 ms steps and 0.6 ms of submit,
# batch 64, 512 tokens, the core on a core of its own, two runs each: TPOT 1.15 / 1.17 against 1.27 / 1.25 ms).
# docs/decisions/engine-core.md.
FRONT_END_DECODE_ROOM_PAGES = 8
ROOM_ENV_VAR = "PIE_DECODE_ROOM_PAGES"  # overrides it (A/B runs: fewer top-ups against pages held ahead)


def decode_room_pages() -> int:
    raw = os.environ.get(ROOM_ENV_VAR, "")
    if raw == "":
        return FRONT_END_DECODE_ROOM_PAGES
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise ValueError(f"{ROOM_ENV_VAR}={raw!r}: must be a whole number of pages from 1 to 1024")
    return int(raw)


@dataclass
class FrontEngine:
    model_name: str
    model_dir: Path
    vocab_size: int
    tokenizer: Tokenizer
    control: RemoteControl
    runtime: Runtime

    @property
    def info(self) -> EngineInfo:
        return self.control.info

    @classmethod
    def connect(cls, core: CoreAddress, runtime_config: RuntimeConfig | None = None) -> "FrontEngine":
        """Waits for the core to have loaded its model. Decoding runs in the core (one request per generate,
        its tokens streamed back): with the control layer in another process, a forward per token would cost
        a round trip each."""
        core = core.current()  # the pid of the core running now (a restarted one has another)
        if not is_alive(core.pid):
            raise RuntimeError(core.load_error() or f"the engine core (process {core.pid}) is not running")
        try:
            control = RemoteControl(core.address, core.pid, core.run_dir)
        except CoreGone as gone:
            raise RuntimeError(core.load_error() or str(gone)) from None
        facts = control.facts
        tokenizer = Tokenizer.from_dir(Path(facts.model_dir))
        config = dataclasses.replace(with_decode_choice(runtime_config or RuntimeConfig()),
                                     decode_room_pages=decode_room_pages())
        runtime = Runtime(control, EngineTokenizerAdapter(tokenizer),
                          model_info(facts.model_name, tokenizer, facts.info, facts.vocab_size), config)
        log.info("front end ready: %s through the engine core (process %d)", facts.model_name, core.pid)
        freeze_heap()  # as the engine core's: its collections walk only what serving keeps
        return cls(facts.model_name, Path(facts.model_dir), facts.vocab_size, tokenizer, control, runtime)

    # The serving process restarts a dead engine core (engine/core/supervisor.py): a new FrontEngine connects to it.
    can_restart = True

    def alive(self) -> bool:
        return self.control.is_alive

    def close(self) -> None:
        self.runtime.close()
        self.control.close()

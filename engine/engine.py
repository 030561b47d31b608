"""The composition root: model files -> tokenizer + executor -> control layer -> Wasm runtime.

The HTTP app and the CLI reach all of it through one Engine object (held in Starlette's lifespan state).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pie_server.engine.config import EngineConfig, EngineInfo, ModelConfig
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.core.messages import CoreFacts
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.remote import EmulatedSpec, RemoteExecutor, WorkerSpec, remote_executor_wanted
from pie_server.engine.executor.tensor_parallel import start_executor
from pie_server.engine.gc_pauses import freeze_heap
from pie_server.engine.grammar import GrammarCompiler, LazyCompiler
from pie_server.engine.model.default_model import DEFAULT_MODEL_NAME
from pie_server.engine.model.loader import load_model_config, resolve_model_dir
from pie_server.engine.runtime.config import ModelInfo, RuntimeConfig
from pie_server.engine.runtime.runtime import Runtime
from pie_server.engine.runtime.tokenizer import EngineTokenizerAdapter
from pie_server.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Engine:
    model_name: str
    model_dir: Path
    model_config: ModelConfig
    tokenizer: Tokenizer
    executor: Executor
    control: Controller
    runtime: Runtime

    @property
    def info(self) -> EngineInfo:
        return self.executor.info

    @classmethod
    def start(cls, model: str | Path | None = None, config: EngineConfig | None = None,
              runtime_config: RuntimeConfig | None = None, model_name: str | None = None,
              progress: bool = True) -> "Engine":
        """Loads the model (None: the embedded default), starts the batcher thread and the Wasm runtime."""
        config = config or EngineConfig()
        model_dir = resolve_model_dir(model)
        model_config = load_model_config(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        # one compiler for the control layer's grammar decodes and the runtime's checks of them
        grammars = LazyCompiler(functools.partial(GrammarCompiler.for_tokenizer, tokenizer, model_config.vocab_size))
        executor, control = _start_control(model_dir, model_config, config, progress, grammars)
        name = model_name_of(model, model_name)
        runtime = Runtime(control, EngineTokenizerAdapter(tokenizer),
                          model_info(name, tokenizer, executor.info, model_config.vocab_size),
                          with_decode_choice(runtime_config or RuntimeConfig()), grammars)
        log.info("engine ready: %s, %d KV pages of %d tokens", name, executor.info.num_pages,
                 executor.info.page_size)
        freeze_heap()
        return cls(name, model_dir, model_config, tokenizer, executor, control, runtime)

    def alive(self) -> bool:
        """False once the batcher thread has died (or the engine was closed): /health then answers 503."""
        return self.control.is_running

    def close(self) -> None:
        self.runtime.close()
        self.control.stop()
        self.executor.close()  # the other tensor-parallel ranks, if any


def with_decode_choice(runtime_config: RuntimeConfig) -> RuntimeConfig:
    """Decoding in the control layer, unless the runtime config says otherwise: measured better on the 2-core
    CPU (HTTP c=1/8/32 +9/+4/+14 %); on CUDA it is what lets pipelined steps feed each decode its token on the
    device (docs/decisions/decoding-in-control.md). PIE_DECODE_IN_CONTROL=0/1 overrides (A/B runs)."""
    forced = os.environ.get("PIE_DECODE_IN_CONTROL")
    if forced is not None:
        return dataclasses.replace(runtime_config, decode_in_control=forced != "0")
    if runtime_config.decode_in_control is None:
        return dataclasses.replace(runtime_config, decode_in_control=True)
    return runtime_config


def model_info(name: str, tokenizer: Tokenizer, info: EngineInfo, vocab_size: int) -> ModelInfo:
    eos = tuple(sorted(tokenizer.eos_token_ids))
    return ModelInfo(name=name, vocab_size=vocab_size, page_size=info.page_size,
                     max_context_len=info.max_context_len, chat_template=tokenizer.chat_template or "",
                     bos_token_id=tokenizer.bos_token_id, eos_token_ids=eos, stop_token_ids=eos)


def model_name_of(model: str | Path | None, model_name: str | None) -> str:
    return model_name or (DEFAULT_MODEL_NAME if model is None else Path(model).name)


def start_core_parts(model: str | Path | None, config: EngineConfig, model_name: str | None,
                     progress: bool = True) -> tuple[Controller, CoreFacts]:
    """The engine core's half of Engine.start: executor and a running Controller, and what front ends learn."""
    model_dir = resolve_model_dir(model)
    model_config = load_model_config(model_dir)
    executor, control = _start_control(model_dir, model_config, config, progress)
    facts = CoreFacts(model_name=model_name_of(model, model_name), model_dir=str(model_dir),
                      vocab_size=model_config.vocab_size, info=executor.info,
                      admission_pages=control.admission.num_pages, can_decode_grammar=control.can_decode_grammar)
    freeze_heap()
    return control, facts


def _start_control(model_dir: Path, model_config: ModelConfig, config: EngineConfig, progress: bool,
                   grammars: LazyCompiler | None = None) -> tuple[Executor, Controller]:
    """grammars: for decodes under a grammar; None: a compiler of its own, made on the first such decode."""
    depth = _speculation_depth_override()  # the environment's choices are checked before anything starts
    remote = remote_executor_wanted()  # PIE_EXECUTOR_PROCESS=1: in a worker process (engine/executor/remote.py)
    emulated_ms = os.environ.get("PIE_EMULATED_DEVICE_MS")
    if emulated_ms:  # no model: steps of that many ms on an emulated device (engine/executor/emulated.py)
        submit_ms = float(os.environ.get("PIE_EMULATED_SUBMIT_MS") or 0)  # host work per step (emulated.py)
        emulated = EmulatedSpec(float(emulated_ms) / 1000, tuple(sorted(Tokenizer.from_dir(model_dir).eos_token_ids)),
                                submit_ms / 1000)
        executor = RemoteExecutor(WorkerSpec(model_dir, model_config, config, emulated)) if remote else \
            emulated.executor(model_config, config)
    elif remote:
        executor = RemoteExecutor(WorkerSpec(model_dir, model_config, config))
    elif config.device == "cpu":  # as ControlConfig.for_engine tells the CPU apart
        executor = _load_on_a_passing_thread(model_dir, model_config, config, progress)
    else:
        executor = start_executor(model_dir, model_config, config, progress)  # rank 0 of --tensor-parallel-size
    grammars = grammars or LazyCompiler(functools.partial(_grammar_compiler, model_dir, model_config.vocab_size))
    # PIE_STEP_LOG=PATH: one line per step into PATH (engine/control/step_log.py; for measurements)
    control_config = ControlConfig.for_engine(config, model_config, step_log=os.environ.get("PIE_STEP_LOG") or None,
                                              **depth)
    if emulated_ms:  # pipelined steps, as on a GPU
        control_config = dataclasses.replace(control_config, pipeline=True)
    control = Controller(executor, control_config, grammars)
    control.start()
    return executor, control


def _speculation_depth_override() -> dict[str, int]:
    """PIE_SPECULATION_DEPTH=1|2: ControlConfig.speculation_depth for pipelined steps (A/B runs); unset: the
    default."""
    raw = os.environ.get("PIE_SPECULATION_DEPTH", "")
    if not raw:
        return {}
    if raw not in ("1", "2"):
        raise ValueError(f"PIE_SPECULATION_DEPTH={raw!r}: must be 1 or 2")
    return {"speculation_depth": int(raw)}


def _grammar_compiler(model_dir: Path, vocab_size: int) -> GrammarCompiler:
    """The control layer's, for decodes under a grammar: made on the first one (the engine core has no tokenizer
    of its own until then)."""
    return GrammarCompiler.for_tokenizer(Tokenizer.from_dir(model_dir), vocab_size)


def _load_on_a_passing_thread(model_dir: Path, model_config: ModelConfig, config: EngineConfig,
                              progress: bool) -> Executor:
    """start_executor on a thread that then ends. OpenMP (libgomp) keeps a pool of workers for every thread that
    ever ran a parallel region; once the pools hold more threads than there are cores, workers stop spinning
    between regions and each of the control loop's matmuls waits for a wake-up (2 cores: a SmolLM2 decode step
    takes 28 ms on the thread that loaded the model, 44 ms on another one; `pie serve` c=1 TPOT 45 -> 30 ms). A
    pool dies with its thread: the control loop's thread is left the only one computing."""
    with ThreadPoolExecutor(1, thread_name_prefix="load") as loader:
        return loader.submit(start_executor, model_dir, model_config, config, progress).result()

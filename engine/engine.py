"""The composition root: model files -> tokenizer + executor -> control layer -> Wasm runtime.

The HTTP app and the CLI reach all of it through one Engine object (held in Starlette's lifespan state).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pie_server.engine.config import EngineConfig, EngineInfo, ModelConfig
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.executor.executor import Executor
from pie_server.engine.model.default_model import DEFAULT_MODEL_NAME
from pie_server.engine.model.loader import load_model_config, load_weights, resolve_model_dir
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
        executor = Executor(model_config, config, load_weights(model_dir, _torch_dtype(config), progress=progress))
        control = Controller(executor, ControlConfig.for_engine(config, model_config))
        control.start()
        name = model_name or (DEFAULT_MODEL_NAME if model is None else Path(model).name)
        runtime = Runtime(control, EngineTokenizerAdapter(tokenizer), _model_info(name, tokenizer, executor),
                          with_decode_choice(runtime_config or RuntimeConfig(), config))
        log.info("engine ready: %s, %d KV pages of %d tokens", name, executor.info.num_pages,
                 executor.info.page_size)
        # Start-up leaves a large long-lived heap (torch, transformers, wasmtime, the model): freezing it keeps
        # the per-token garbage of the decode loop from triggering full collections that walk all of it.
        gc.collect()
        gc.freeze()
        return cls(name, model_dir, model_config, tokenizer, executor, control, runtime)

    def alive(self) -> bool:
        """False once the batcher thread has died (or the engine was closed): /health then answers 503."""
        return self.control.is_running

    def close(self) -> None:
        self.runtime.close()
        self.control.stop()


def with_decode_choice(runtime_config: RuntimeConfig, config: EngineConfig) -> RuntimeConfig:
    """Decoding in the control layer measured better on the 2-core CPU (HTTP c=1/8/32 +9/+4/+14 %) but not on
    the H200, where the host is GIL-bound either way (docs/decisions/decoding-in-control.md): unless the runtime
    config says, on for CPU and off for CUDA until the engine core's pipelined loop. PIE_DECODE_IN_CONTROL=0/1
    overrides both (A/B runs)."""
    forced = os.environ.get("PIE_DECODE_IN_CONTROL")
    if forced is not None:
        return dataclasses.replace(runtime_config, decode_in_control=forced != "0")
    if runtime_config.decode_in_control is None:
        return dataclasses.replace(runtime_config, decode_in_control=config.device == "cpu")
    return runtime_config


def _torch_dtype(config: EngineConfig):  # -> torch.dtype, imported lazily to keep start-up imports light
    import torch

    return getattr(torch, config.resolved_dtype)


def _model_info(name: str, tokenizer: Tokenizer, executor: Executor) -> ModelInfo:
    eos = tuple(sorted(tokenizer.eos_token_ids))
    return ModelInfo(name=name, vocab_size=executor.model_config.vocab_size, page_size=executor.info.page_size,
                     max_context_len=executor.info.max_context_len, chat_template=tokenizer.chat_template or "",
                     bos_token_id=tokenizer.bos_token_id, eos_token_ids=eos, stop_token_ids=eos)

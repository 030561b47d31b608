"""A stand-in for engine/engine.py's Engine (until the composition root lands): executor + controller +
runtime + tokenizer for a local model directory, with the attribute names the HTTP layer uses."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.control.config import ControlConfig
from engine.control.controller import Controller
from engine.executor.executor import Executor
from engine.model.loader import load_model_config, load_weights
from engine.runtime.config import ModelInfo, RuntimeConfig
from engine.runtime.runtime import Runtime
from engine.runtime.tokenizer import EngineTokenizerAdapter
from engine.tokenizer import Tokenizer


class LocalEngine:
    def __init__(self, model_dir: Path, config: EngineConfig, name: str = "default",
                 runtime_cache_dir: Path | None = None) -> None:
        self.model_name = name
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model_config = load_model_config(model_dir)
        weights = load_weights(model_dir, torch.float32, progress=False)
        self.executor = Executor(self.model_config, config, weights)
        self.info = self.executor.info
        self.control = Controller(self.executor, ControlConfig.for_engine(config, self.model_config))
        self.control.start()
        model_info = ModelInfo(
            name=name, vocab_size=self.model_config.vocab_size, page_size=self.info.page_size,
            max_context_len=self.info.max_context_len, chat_template=self.tokenizer.chat_template or "",
            bos_token_id=self.tokenizer.bos_token_id, eos_token_ids=tuple(sorted(self.tokenizer.eos_token_ids)))
        self.runtime = Runtime(self.control, EngineTokenizerAdapter(self.tokenizer), model_info, RuntimeConfig(
            cache_dir=None if runtime_cache_dir is None else str(runtime_cache_dir)))
        self.vocab_size = self.model_config.vocab_size

    def close(self) -> None:
        self.runtime.close()
        self.control.stop()

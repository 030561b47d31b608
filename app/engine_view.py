"""What the HTTP layer uses of the engine, in one place (engine/engine.py is the composition root).

The app touches the engine only through EngineView, so a test can hand create_app a small fake engine
with the same attribute names: model_name, info (EngineInfo), tokenizer, control (stats()), runtime
(load, launch), close().
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

from pie_server.app.inferlet_run import InstanceHandle
from pie_server.app.metrics import EngineGauges
from pie_server.engine.control.admission import Admission
from pie_server.engine.control.api import ControlStats


class EngineView:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_context_len: int = engine.info.max_context_len
        self.num_pages: int = engine.info.num_pages
        self.page_size: int = engine.info.page_size
        self.vocab_size: int = _vocab_size(engine)
        # The engine's request admission by KV pages (engine/control/admission.py), shared by every front end.
        self.admission: Admission = engine.control.admission
        # token id -> text, for logprobs (decoding one token at a time is the slow part of them)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)
        self.special_prefix_ids: list[int] = self._special_prefix_ids()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens:
            return list(self.tokenizer.encode(text, add_special_tokens=True))
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids)))

    def _special_prefix_ids(self) -> list[int]:
        """What the tokenizer puts in front of a plain prompt (e.g. BOS): completions prompts get it, as
        with vLLM; chat templates write their own."""
        plain, special = self.encode("a"), self.encode("a", add_special_tokens=True)
        cut = len(special) - len(plain)
        return special[:cut] if cut > 0 and special[cut:] == plain else []

    def _token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            add_generation_prompt: bool) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tools=tools,
                                                      add_generation_prompt=add_generation_prompt))

    def load_program(self, wasm: bytes) -> str:
        return str(self.engine.runtime.load(wasm))

    def launch(self, program_hash: str, arguments: list[str], tenant: str, limits: Any = None) -> InstanceHandle:
        """limits: engine/runtime/config.py InstanceLimits (None: the runtime's own)."""
        if limits is None:
            return self.engine.runtime.launch(program_hash, arguments, tenant)
        return self.engine.runtime.launch(program_hash, arguments, tenant, limits=limits)

    def keep_warm(self, program_hash: str, num_instances: int) -> None:
        """Keep instances of the program started ahead of their launch (an engine without warm instances: none)."""
        keep_warm = getattr(self.engine.runtime, "keep_warm", None)
        if keep_warm is not None and num_instances > 0:
            keep_warm(program_hash, num_instances)

    def alive(self) -> bool:
        check = getattr(self.engine, "alive", None)
        return bool(check()) if callable(check) else True

    @property
    def can_restart(self) -> bool:
        """Whether a new engine from the same factory replaces this one once it died (app/state.py _watch): a
        front end's, whose engine core the serving process restarts (engine/core/supervisor.py)."""
        return bool(getattr(self.engine, "can_restart", False))

    def control_stats(self) -> ControlStats:
        return self.engine.control.stats()

    def gauges(self, num_running: int, num_queued: int) -> EngineGauges:
        stats = self.control_stats()
        used = 1.0 - stats.num_free_pages / stats.num_pages if stats.num_pages else 0.0
        return EngineGauges(num_requests_running=num_running,
                            num_requests_waiting=num_queued + stats.num_waiting,
                            kv_cache_usage=used, prefix_cache_queries=stats.num_prefix_query_tokens,
                            prefix_cache_hits=stats.num_prefix_hit_tokens, num_preemptions=stats.num_evictions)

    def close(self) -> None:
        self.engine.close()


def _vocab_size(engine: Any) -> int:
    # The model's vocabulary (what the sampler and the host check ids against) before the tokenizer's.
    for holder, name in ((engine, "vocab_size"), (getattr(engine, "model_config", None), "vocab_size"),
                         (engine.tokenizer, "vocab_size")):
        value = getattr(holder, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the engine does not say its vocabulary size")

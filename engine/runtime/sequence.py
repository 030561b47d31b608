"""One sequence of a host-side `generate`: what the decode loops (api_generate.py) keep of it between tokens.
Invariant: `pages` hold `context_len` tokens (the last page holds the rest of context_len), and `pending` tokens
follow them at positions `position, position + 1, ...`."""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence as Ids

from pie_server.engine.control.api import Control, ControlError, call_later
from pie_server.engine.grammar import GrammarMatcher, GrammarSpec
from pie_server.engine.runtime.stop_strings import StopMatcher
from pie_server.engine.runtime.tokenizer import StreamDecoder
from pie_server.engine.step import SamplingParams
from pie_server.engine.types import InstanceId

log = logging.getLogger(__name__)

FINISH_EVICTED = "evicted"  # the last resort of preemption dropped the instance's KV (the WIT's finish-reason)


@dataclass
class Sequence:
    pages: list[int]
    context_len: int  # tokens whose KV is in pages (pages cover exactly this, rounded up to a page)
    pending: list[int]
    position: int
    params: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    stop: StopMatcher
    decoder: StreamDecoder
    stream_channel: int | None
    penalized: bool  # penalties need the output so far in every step's params
    page_size: int
    allocated: list[int] = field(default_factory=list)  # pages this call added (freed again on error)
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    grammar_spec: GrammarSpec | None = None  # a json-schema or regex constraint
    grammar: GrammarMatcher | None = None  # its matcher, while the host runs it (forward by forward)
    stream_logprobs: bool = False  # deltas are JSON events with the logprobs of their tokens
    num_sent_logprobs: int = 0  # logprobs already streamed (invariant: <= len(logprobs))

    @property
    def active(self) -> bool:
        return self.finish_reason is None and self.error is None

    def num_slots_wanted(self, max_context_len: int) -> int:
        """Slots the sequence may still fill after its pending tokens: up to max_tokens (the last token sampled
        needs none) and the model's context."""
        return min(self.max_tokens - len(self.generated) - 1,
                   max_context_len - self.context_len - len(self.pending))


def free_later(control: Control, instance_id: InstanceId, page_ids: Ids[int]) -> None:
    """Frees pages without waiting: the scheduler thread serves every instance, and a round trip to an engine
    core per generate held all of them (~7 % of that thread in the agentic profile). The core serves a front end's
    calls in order, so the instance's next call sees the pages freed; the one expected error (the instance is
    closing: its pages go anyway) is dropped."""
    call_later(control, "free_pages", instance_id, page_ids).add_done_callback(_drop_closing_error)


def _drop_closing_error(done: Future[None]) -> None:
    error = None if done.cancelled() else done.exception()
    if error is not None and not isinstance(error, ControlError):
        log.error("freeing a generate's unused pages failed", exc_info=error)

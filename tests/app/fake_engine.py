"""A stand-in engine for tests of the HTTP layer alone: a byte-level tokenizer and a runtime whose
"instances" are threads speaking the default inferlet's protocol (inferlets/builtin/default/README.md).
The real engine and the Wasm inferlet are exercised by test_e2e_*.py."""
from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from pie_server.engine.config import EngineInfo
from pie_server.engine.control.admission import Admission
from pie_server.engine.control.api import ControlStats
from pie_server.engine.runtime.messages import Event, Mailbox, Message, Terminated, Text

EOS = 256
VOCAB_SIZE = 260
REPLY = "The quick brown fox jumps over the lazy dog. "
PAGES_PER_INSTANCE = 2


class FakeTokenizer:
    vocab_size = VOCAB_SIZE
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: Any = None,
                            add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeHandle:
    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.outbox: Mailbox[Message] = Mailbox()
        self.killed = threading.Event()
        self.inbox: Mailbox[str] = Mailbox()
        self.trace_marks: dict[str, float] | None = None

    def trace_into(self, marks: dict[str, float]) -> None:
        self.trace_marks = marks

    def mark(self, phase: str) -> None:
        """What the runtime's generate path marks in a traced request (app/request_trace.py)."""
        if self.trace_marks is not None:
            self.trace_marks.setdefault(phase, time.monotonic())

    def send(self, message: str) -> None:
        self.inbox.put(message)

    async def next_message(self) -> Message:
        return await self.outbox.aget()

    def try_next_message(self) -> Message | None:
        return self.outbox.try_get()

    def kill(self) -> None:
        self.killed.set()


@dataclass
class FakeRuntime:
    tokenizer: FakeTokenizer
    max_context_len: int
    token_delay_s: float = 0.0
    fail_after_tokens: int | None = None  # then the instance ends with an error, mid-stream

    def __post_init__(self) -> None:
        self.loaded: list[bytes] = []
        self.launched: list[FakeHandle] = []
        self.arguments: list[dict[str, Any]] = []
        self.num_live = 0
        self.max_live = 0  # the most instances live at once so far
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def load(self, wasm: bytes) -> str:
        self.loaded.append(wasm)
        return "fakehash"

    def launch(self, program_hash: str, arguments: list[str], tenant: str) -> FakeHandle:
        assert program_hash == "fakehash" and len(arguments) == 1
        handle = FakeHandle(f"fake-{next(self._ids)}")
        self.launched.append(handle)
        self.arguments.append(json.loads(arguments[0]))
        with self._lock:
            self.num_live += 1
            self.max_live = max(self.max_live, self.num_live)
        threading.Thread(target=self._run, args=(handle, json.loads(arguments[0])), daemon=True).start()
        return handle

    def _run(self, handle: FakeHandle, request: dict[str, Any]) -> None:
        try:
            ok = _fake_inferlet(handle, request, self.tokenizer, self.max_context_len, self.token_delay_s,
                                self.fail_after_tokens)
            handle.outbox.put(Terminated(ok=True) if ok else Terminated(ok=False, error="killed"))
        except _Crash as crash:
            handle.outbox.put(Terminated(ok=False, error=str(crash)))
        finally:
            with self._lock:
                self.num_live -= 1


class _Crash(Exception):
    pass


def _fake_inferlet(handle: FakeHandle, request: dict[str, Any], tokenizer: FakeTokenizer,
                   max_context_len: int, delay_s: float, fail_after_tokens: int | None) -> bool:
    prompt_ids = []
    for prompt in request["prompts"]:
        if "messages" in prompt:
            prompt_ids.append(tokenizer.encode(tokenizer.apply_chat_template(prompt["messages"])))
        else:
            prompt_ids.append(list(prompt["token_ids"]) if "token_ids" in prompt else tokenizer.encode(prompt["text"]))
    for ids in prompt_ids:
        if len(ids) + (request["max_tokens"] or 1) > max_context_len:
            handle.outbox.put(Event(json.dumps({
                "type": "error", "status": 400, "code": "context_length_exceeded", "param": "messages",
                "message": f"This model's maximum context length is {max_context_len} tokens."})))
            return True
    max_tokens = request["max_tokens"] or 64
    handle.outbox.put(Event(json.dumps({"type": "prompt", "prompt_tokens": [len(p) for p in prompt_ids],
                                        "max_tokens": [max_tokens] * len(prompt_ids)})))
    while True:  # wait for "go" (the server reserves KV pages first)
        try:
            if handle.inbox.get(timeout=0.05) == "go":
                break
        except TimeoutError:
            if handle.killed.is_set():
                return False
    handle.mark("submitted")
    choices = []
    n = request["n"]
    for index in range(len(prompt_ids) * n):
        reply = REPLY * 20
        tokens = tokenizer.encode(reply)[:max_tokens]
        text = tokenizer.decode(tokens)
        finish = "length"
        for stop in request["stop"]:
            if stop in text:
                text, finish = text[:text.index(stop)], "stop"
                tokens = tokenizer.encode(text) + [EOS]
        for position, token in enumerate(tokens):
            if handle.killed.is_set():
                return False
            if position == fail_after_tokens:
                raise _Crash("RuntimeError: generate: the executor failed this step")
            time.sleep(delay_s)
            handle.mark("received")
            if token < 256:
                handle.outbox.put(Text(tokenizer.decode([token]), channel=index))
        num_logprobs = request["sampling"]["num_logprobs"]
        logprobs = None if num_logprobs is None else [
            [t, -0.5, [[t, -0.5]] + [[(t + k) % 256, -1.0 - k] for k in range(1, num_logprobs)][:num_logprobs]]
            for t in tokens]
        choices.append({"index": index, "text": text, "finish_reason": finish, "num_tokens": len(tokens),
                        "logprobs": logprobs})
    handle.outbox.put(Event(json.dumps({"type": "result", "choices": choices,
                                        "cached_tokens": [0] * len(prompt_ids)})))
    return True


class FakeControl:
    def __init__(self, runtime: FakeRuntime, num_pages: int) -> None:
        self.runtime = runtime
        self.num_pages = num_pages
        self.admission = Admission.for_pool(num_pages)  # as the Controller keeps it

    def stats(self) -> ControlStats:
        used = self.runtime.num_live * PAGES_PER_INSTANCE
        return ControlStats(num_pages=self.num_pages, num_free_pages=self.num_pages - used,
                            num_instances=self.runtime.num_live, num_running=self.runtime.num_live,
                            num_waiting=0, num_swapped=0, num_prefix_queries=3, num_prefix_hit_tokens=16,
                            num_prefix_query_tokens=48)


class FakeEngine:
    model_name = "fake-model"

    def __init__(self, max_context_len: int = 512, token_delay_s: float = 0.0, num_pages: int = 1024,
                 fail_after_tokens: int | None = None) -> None:
        self.tokenizer = FakeTokenizer()
        self.info = EngineInfo(num_pages=num_pages, page_size=16, max_context_len=max_context_len,
                               kv_bytes_per_page=1024)
        self.runtime = FakeRuntime(self.tokenizer, max_context_len, token_delay_s, fail_after_tokens)
        self.control = FakeControl(self.runtime, num_pages)
        self.closed = False

    def close(self) -> None:
        self.closed = True


class RestartableEngine(FakeEngine):
    """A front end's engine as AppState sees it: one that can die (is_alive = False) and be replaced by a new one
    from the same factory (app/state.py `_watch`)."""

    can_restart = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.is_alive = True

    def alive(self) -> bool:
        return self.is_alive

"""Prompts as token ids before the launch: tokenized in the front end (off the event loop), as vLLM's front end
does, so that the default inferlet's start (the time to first token under load) holds no chat template or
tokenizer call. A prompt that cannot fit the model's context gets vLLM's 400 (`context_length_exceeded`) here; a
text too long to fit even at the vocabulary's longest token is refused without tokenizing it (the message then
gives a lower bound on its tokens). Token ids are also shorter than the text that makes up a context, so every
prompt that fits the context fits the runtime's MAX_ARGUMENTS_BYTES of launch arguments (up to about 150,000
tokens).
"""
from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from pie_server.app.engine_view import EngineView
from pie_server.app.errors import ApiError
from pie_server.engine.runtime.runtime import MAX_ARGUMENTS_BYTES

# Prompts up to this many characters are tokenized on the event loop (about 0.1-0.5 ms: a thread's hop and its
# wait for the GIL under load cost more), longer ones in a worker thread.
MAX_INLINE_CHARS = 16384


def context_length_error(limit: int, num_prompt: int, max_tokens: int | None, param: str,
                         at_least: bool = False) -> ApiError:
    """vLLM's wording (the default inferlet says the same for prompts it tokenized)."""
    wanted = max_tokens or 1
    more = "at least " if at_least else ""
    return ApiError(
        f"This model's maximum context length is {limit} tokens. However, you requested {more}"
        f"{num_prompt + wanted} tokens ({more}{num_prompt} in the messages, {wanted} in the completion). "
        f"Please reduce the length of the messages or completion.", 400, param=param, code="context_length_exceeded")


async def fit_arguments(request: dict[str, Any], view: EngineView, param: str) -> str:
    """The default inferlet's launch argument for request (app/openai/inferlet_args.py) with every prompt as
    token ids, or an ApiError."""
    limit, max_tokens = view.max_context_len, request["max_tokens"]
    prompts = request["prompts"]
    if sum(_num_chars(prompt) for prompt in prompts) <= MAX_INLINE_CHARS:
        all_ids = _all_prompt_ids(prompts, view, limit, max_tokens, param)
    else:
        all_ids = await asyncio.to_thread(_all_prompt_ids, prompts, view, limit, max_tokens, param)
    for ids in all_ids:
        if len(ids) + (max_tokens or 1) > limit:
            raise context_length_error(limit, len(ids), max_tokens, param)
    fitted = json.dumps({**request, "prompts": [{"token_ids": ids} for ids in all_ids]}, separators=(",", ":"))
    if len(fitted) > MAX_ARGUMENTS_BYTES:  # ASCII; only with a context of about 150,000 tokens or more
        raise ApiError(f"the request is too large: its prompts take more than {MAX_ARGUMENTS_BYTES} bytes even as "
                       f"token ids", 400, param=param, code="request_too_large")
    return fitted


def _num_chars(prompt: dict[str, Any]) -> int:
    if "messages" in prompt:
        return sum(len(str(m.get("content") or "")) for m in prompt["messages"]) + len(json.dumps(prompt.get("tools")))
    return len(prompt.get("text", ""))


def _all_prompt_ids(prompts: list[dict[str, Any]], view: EngineView, limit: int, max_tokens: int | None,
                    param: str) -> list[list[int]]:
    return [_prompt_ids(prompt, view, limit, max_tokens, param) for prompt in prompts]


def _prompt_ids(prompt: dict[str, Any], view: EngineView, limit: int, max_tokens: int | None,
                param: str) -> list[int]:
    if "token_ids" in prompt:
        return list(prompt["token_ids"])
    if "messages" in prompt:
        try:
            text = view.apply_chat_template(prompt["messages"], prompt.get("tools"),
                                            prompt.get("add_generation_prompt", True))
        except ValueError as exc:  # the tokenizer's wording (engine/tokenizer.py)
            raise ApiError(str(exc), 400, param="messages") from None
        prefix: list[int] = []
    else:
        text, prefix = prompt["text"], list(prompt.get("prefix_token_ids", []))
    longest = _longest_token_bytes(view.tokenizer)
    num_bytes = len(text.encode("utf-8", "surrogatepass"))
    if longest and num_bytes > limit * longest:  # more tokens than the context for sure: not worth tokenizing
        raise context_length_error(limit, -(-num_bytes // longest), max_tokens, param, at_least=True)
    return prefix + view.encode(text)


@functools.lru_cache(maxsize=4)
def _longest_token_bytes(tokenizer: Any) -> int:
    """The most bytes one token stands for (0: unknown, then every prompt is tokenized)."""
    token_bytes = getattr(tokenizer, "token_bytes", None)
    return max((len(b) for b in token_bytes()), default=0) if callable(token_bytes) else 0

"""Requests too big to pass to the inferlet as its argument: an answer or a 400, never a 500.

The runtime takes at most MAX_ARGUMENTS_BYTES of arguments per instance. Below that (every ordinary request)
nothing happens here: the inferlet tokenizes and checks the context itself. Above it the prompts are
tokenized here (off the event loop), as vLLM's front end does: a prompt that cannot fit the model's context
gets vLLM's 400 (`context_length_exceeded`); one that fits is passed as token ids, which are shorter than
the text that makes up a context. A text too long to fit even at the vocabulary's longest token is refused
without tokenizing it (the message then gives a lower bound on its tokens).
"""
from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from pie_server.app.engine_view import EngineView
from pie_server.app.errors import ApiError
from pie_server.engine.runtime.runtime import MAX_ARGUMENTS_BYTES


def context_length_error(limit: int, num_prompt: int, max_tokens: int | None, param: str,
                         at_least: bool = False) -> ApiError:
    """vLLM's wording (the default inferlet says the same for prompts it tokenized)."""
    wanted = max_tokens or 1
    more = "at least " if at_least else ""
    return ApiError(
        f"This model's maximum context length is {limit} tokens. However, you requested {more}"
        f"{num_prompt + wanted} tokens ({more}{num_prompt} in the messages, {wanted} in the completion). "
        f"Please reduce the length of the messages or completion.", 400, param=param, code="context_length_exceeded")


async def fit_arguments(arguments: str, view: EngineView, param: str) -> str:
    """arguments as they are when small enough; else with every prompt as token ids (or an ApiError)."""
    if len(arguments.encode()) <= MAX_ARGUMENTS_BYTES:
        return arguments
    request = json.loads(arguments)
    limit, max_tokens = view.max_context_len, request["max_tokens"]
    prompts = []
    for prompt in request["prompts"]:
        ids = await asyncio.to_thread(_prompt_ids, prompt, view, limit, max_tokens, param)
        if len(ids) + (max_tokens or 1) > limit:
            raise context_length_error(limit, len(ids), max_tokens, param)
        prompts.append({"token_ids": ids})
    fitted = json.dumps({**request, "prompts": prompts}, separators=(",", ":"))
    if len(fitted.encode()) > MAX_ARGUMENTS_BYTES:  # only with a context of about 150,000 tokens or more
        raise ApiError(f"the request is too large: its prompts take more than {MAX_ARGUMENTS_BYTES} bytes even as "
                       f"token ids", 400, param=param, code="request_too_large")
    return fitted


def _prompt_ids(prompt: dict[str, Any], view: EngineView, limit: int, max_tokens: int | None,
                param: str) -> list[int]:
    if "token_ids" in prompt:
        return list(prompt["token_ids"])
    if "messages" in prompt:
        try:
            text = view.apply_chat_template(prompt["messages"], prompt.get("tools"),
                                            prompt.get("add_generation_prompt", True))
        except ValueError as exc:
            raise ApiError(f"the chat template rejected the conversation: {exc}", 400, param="messages") from None
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

"""Requests -> the default inferlet's launch argument (one JSON object, format in inferlets/builtin/default/README.md;
app/openai/prompt_fit.py turns its prompts into token ids and writes it)."""
from __future__ import annotations

from typing import Any

from pie_server.app.openai.chat_request import ChatRequest
from pie_server.app.openai.completion_request import CompletionRequest
from pie_server.app.openai.params import GenerationParams

ARGS_VERSION = 1


def _common(params: GenerationParams) -> dict[str, Any]:
    return {"version": ARGS_VERSION, "n": params.n, "max_tokens": params.max_tokens,
            "sampling": params.sampling.to_json(), "stop": list(params.stop),
            "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
            "constraint": params.constraint, "stream": params.stream,
            "skip_special_tokens": params.skip_special_tokens,
            "spaces_between_special_tokens": params.spaces_between_special_tokens}


def chat_arguments(request: ChatRequest) -> dict[str, Any]:
    prompt: dict[str, Any] = {"messages": list(request.messages),
                              "add_generation_prompt": request.add_generation_prompt}
    if request.tools is not None:
        prompt["tools"] = list(request.tools.tools)
    return {**_common(request.params), "prompts": [prompt]}


def completion_arguments(request: CompletionRequest, special_prefix_ids: list[int]) -> dict[str, Any]:
    """special_prefix_ids: what the tokenizer adds in front of a text prompt (e.g. BOS)."""
    prompts = [{"text": p, "prefix_token_ids": special_prefix_ids} if isinstance(p, str) else {"token_ids": p}
               for p in request.prompts]
    return {**_common(request.params), "prompts": prompts, "prompt_logprobs": request.num_prompt_logprobs}

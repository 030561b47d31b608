"""POST /v1/completions: the request body -> a validated CompletionRequest."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Union

from pie_server.app.errors import invalid
from pie_server.app.openai.fields import get_bool, get_int, get_str, token_id_list
from pie_server.app.openai.params import (MAX_TOP_LOGPROBS, GenerationParams, ModelLimits, check_model,
                               parse_generation, parse_response_format)

MAX_PROMPTS = 64
MAX_CHOICES = 64  # sequences one generate-all call runs in lockstep

Prompt = Union[str, list[int]]  # text, or token ids


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[Prompt, ...]  # choices are numbered prompt_index * n + j
    params: GenerationParams
    echo: bool
    logprobs: int | None
    prompt_logprobs: int | None = None  # vLLM's field: top alternatives per prompt token (0: the token's own)

    @property
    def num_prompt_logprobs(self) -> int | None:
        """What the inferlet computes: echo with logprobs needs the prompt's too (OpenAI's legacy shape)."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs


def parse_completion_request(body: Mapping[str, Any], limits: ModelLimits) -> CompletionRequest:
    model = check_model(body, limits)
    prompts = _prompts(body.get("prompt"), limits)
    logprobs = get_int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    echo = get_bool(body, "echo", False)
    prompt_logprobs = get_int(body, "prompt_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if get_str(body, "suffix", ""):
        raise invalid("'suffix' is not supported", "suffix")
    params = parse_generation(body, limits, logprobs)
    if len(prompts) * params.n > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices per request (prompts x n)", "n")
    if body.get("max_tokens") is None:
        params = replace(params, max_tokens=16)  # OpenAI's default for completions
    return CompletionRequest(model=model, prompts=prompts,
                             params=replace(params, constraint=parse_response_format(body)),
                             echo=echo, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _prompts(prompt: Any, limits: ModelLimits) -> tuple[Prompt, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if not isinstance(prompt, list) or not prompt:
        raise invalid("'prompt' must be a string, an array of strings, or an array of token ids", "prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return (token_id_list(prompt, "prompt", limits.vocab_size),)
    if len(prompt) > MAX_PROMPTS:
        raise invalid(f"'prompt' may hold at most {MAX_PROMPTS} prompts", "prompt")
    out: list[Prompt] = []
    for item in prompt:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and item:
            out.append(token_id_list(item, "prompt", limits.vocab_size))
        else:
            raise invalid("'prompt' items must be strings or non-empty arrays of token ids", "prompt")
    return tuple(out)

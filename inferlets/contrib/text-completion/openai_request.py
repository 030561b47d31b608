"""Serving an OpenAI request: what an inferlet does when the server runs it for /v1/chat/completions or
/v1/completions with "model": "inferlet:NAME" (protocol: docs/api.md, "Your inferlet behind the OpenAI routes").

The server launches the inferlet with one argument, the request as JSON (already validated: messages
normalized, sampling parameters in range). The inferlet answers with
  1. the event {"type": "prompt", "prompt_tokens": [per prompt], "max_tokens": [per prompt]} (or an
     {"type": "error", ...} event and nothing else), then waits for the message "go";
  2. text on channel prompt_index * n + j for choice j of a prompt, as it is decoded;
  3. the event {"type": "result", "choices": [...], "cached_tokens": [per prompt]}.
Copy this module into your own inferlet to serve OpenAI clients; change how `_generate` generates.
"""
import json

from pie_sdk import (Context, JsonSchema, PieError, Sampler, apply_chat_template, encode, generate_all, model_info,
                     receive, send_event)

PROTOCOL_VERSION = 1


class RequestError(Exception):
    """A request this inferlet cannot serve: the client gets a 400 with this message."""

    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param = param
        self.code = code


def parse(args):
    """The request when args are the server's (one JSON object with "prompts"), else None."""
    if len(args) != 1 or not args[0].lstrip().startswith("{"):
        return None
    request = json.loads(args[0])
    return request if isinstance(request, dict) and "prompts" in request else None


def serve(request):
    info = model_info()
    try:
        if request.get("version") != PROTOCOL_VERSION:
            raise RequestError(f"request version {request.get('version')!r}; this inferlet speaks {PROTOCOL_VERSION}")
        prompts = [_prompt_ids(prompt, info) for prompt in request["prompts"]]
        max_tokens = [_max_tokens(request["max_tokens"], ids, info) for ids in prompts]
        sampler = _sampler(request["sampling"])
        constraint = _constraint(request.get("constraint"))
    except RequestError as error:
        send_event({"type": "error", "status": 400, "message": str(error), "param": error.param,
                    "code": error.code})
        return
    send_event({"type": "prompt", "prompt_tokens": [len(ids) for ids in prompts], "max_tokens": max_tokens})
    if receive() != "go":  # the server reserves the KV pages first (and may queue the request meanwhile)
        return
    n = request["n"]
    choices = []
    for p, ids in enumerate(prompts):
        channels = [p * n + j for j in range(n)]
        generations = _generate(ids, n, max_tokens[p], sampler, constraint, request, channels)
        choices += [_choice(index, generation, sampler) for index, generation in zip(channels, generations)]
    send_event({"type": "result", "choices": choices, "cached_tokens": [0] * len(prompts)})


def _generate(ids, n, max_tokens, sampler, constraint, request, channels):
    """n choices after the prompt ids, streamed on channels: the prompt is prefilled once, and forks share
    its pages; with a seed, choice j samples with seed + j."""
    ctx = Context()
    ctx.fill(ids)
    contexts = [ctx] + [ctx.fork() for _ in range(n - 1)]
    try:
        return generate_all(contexts, max_tokens, sampler=sampler, stop=request["stop"],
                            stop_token_ids=request["stop_token_ids"], ignore_eos=request["ignore_eos"],
                            constraint=constraint, stream_channels=channels)
    finally:
        for context in contexts:
            context.release()


def _prompt_ids(prompt, info):
    if "messages" in prompt:
        try:
            text = apply_chat_template(prompt["messages"], prompt.get("tools"),
                                       prompt.get("add_generation_prompt", True))
        except PieError as error:
            raise RequestError(f"the chat template rejected the conversation: {error}", "messages") from None
        ids = encode(text)
    elif "token_ids" in prompt:
        ids = [int(t) for t in prompt["token_ids"]]
    else:
        ids = list(prompt.get("prefix_token_ids", [])) + encode(prompt["text"])
    if not ids:
        if info.bos_token_id is None:
            raise RequestError("the prompt is empty", "prompt")
        ids = [info.bos_token_id]
    return ids


def _max_tokens(wanted, ids, info):
    """wanted, or the rest of the context when None; 400 when prompt and completion do not fit."""
    room = info.max_context_len - len(ids)
    if room < 1 or (wanted is not None and wanted > room):
        raise RequestError(f"This model's maximum context length is {info.max_context_len} tokens. However, you "
                           f"requested {len(ids) + (wanted or 1)} tokens ({len(ids)} in the prompt, {wanted or 1} "
                           "in the completion).", "messages", "context_length_exceeded")
    return room if wanted is None else wanted


def _sampler(sampling):
    seed = sampling["seed"]
    try:
        return Sampler(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
                       min_p=sampling["min_p"], seed=None if seed is None else seed % 2 ** 64,
                       presence_penalty=sampling["presence_penalty"],
                       frequency_penalty=sampling["frequency_penalty"],
                       repetition_penalty=sampling["repetition_penalty"],
                       logit_bias={int(t): float(b) for t, b in sampling["logit_bias"]},
                       num_logprobs=sampling["num_logprobs"])
    except ValueError as error:
        raise RequestError(str(error)) from None


def _constraint(spec):
    if spec is None:
        return None
    if spec["type"] == "json_object":
        return JsonSchema({"type": "object"})
    if spec["type"] == "json_schema":
        return JsonSchema(spec["schema"])
    raise RequestError(f"unknown constraint {spec['type']!r}", "response_format")


def _choice(index, generation, sampler):
    logprobs = None
    if sampler.num_logprobs is not None:
        logprobs = [[p.token_id, p.logprob, [list(alt) for alt in p.top_logprobs]] for p in generation.logprobs]
    return {"index": index, "text": generation.text, "finish_reason": generation.finish_reason,
            "num_tokens": len(generation.token_ids), "logprobs": logprobs}

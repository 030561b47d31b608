"""The built-in default inferlet: serves /v1/chat/completions and /v1/completions.

Launched with one argument, the request as JSON (format and events in README.md). Per prompt it renders
the chat template, tokenizes, reuses the longest cached page-aligned prefix (earlier requests' pages), and
for n > 1 prefills the page-aligned part once and shares those pages between the choices. The decode loop
runs in the host (generate / generate-all: engine-side sampling, stop tokens and strings, incremental
detokenization, streaming on channel = choice index). Full pages are published to the prefix cache after.
"""
import json

from componentize_py_types import Err, Ok
from wit_world.imports import forward, generate, kv, messaging, model, prefix_cache, tokenize, types

FINISH_REASONS = {types.FinishReason.STOP: "stop", types.FinishReason.LENGTH: "length"}
# What prepare() takes through a request's paths (the shape of app/openai/inferlet_args.py's chat arguments).
_SAMPLE_REQUEST = json.dumps({
    "version": 1, "n": 1, "max_tokens": 16, "stop": [], "stop_token_ids": [], "ignore_eos": False,
    "constraint": None, "stream": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": None, "presence_penalty": 0.0,
                 "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": [], "num_logprobs": None},
    "prompts": [{"messages": [{"role": "user", "content": "Hello, how are you?"}], "add_generation_prompt": True}]})
_info = None  # model.info(), asked once


class RequestError(Exception):
    """The request cannot be served as asked (reported to the client as a 400, not as a crash)."""

    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param = param
        self.code = code


def main(args):
    if len(args) != 1:
        raise ValueError("the default inferlet takes one argument: the request as JSON")
    request = json.loads(args[0])
    info = _model_info()
    try:
        prompts = [_prompt_ids(p, info) for p in request["prompts"]]
        max_tokens = _max_tokens(request, prompts, info)
        constraint = _constraint(request.get("constraint"))
    except RequestError as error:
        _send({"type": "error", "status": 400, "message": str(error), "param": error.param, "code": error.code})
        return
    n = request["n"]
    _send({"type": "prompt", "prompt_tokens": [len(ids) for ids in prompts], "max_tokens": max_tokens})
    if messaging.receive(None) != "go":  # the server reserves our KV pages first (it may queue us)
        return
    num_prompt_logprobs = request.get("prompt_logprobs")
    if num_prompt_logprobs is not None:
        for p, ids in enumerate(prompts):
            _send({"type": "prompt_logprobs", "prompt": p, "first_token_id": ids[0],
                   "logprobs": _prompt_logprobs(ids, num_prompt_logprobs, info.page_size)})
    prefixes = [_shared_prefix(ids, n, info.page_size) for ids in prompts]
    requests, owners = [], []
    for p, (ids, (pages, num_cached)) in enumerate(zip(prompts, prefixes)):
        for j in range(n):
            choice_pages = pages if j == 0 or not pages else _call(kv.share_pages, pages)
            requests.append(_generate_request(request, ids, choice_pages, num_cached, info.page_size,
                                              max_tokens[p], p * n + j, j, constraint))
            owners.append(p)
    generations = _generate(requests, _options(request))
    for p, ids in enumerate(prompts):
        _publish(ids, generations[p * n], info.page_size)
    _send({"type": "result", "choices": [_choice(i, g, request) for i, g in enumerate(generations)],
           "cached_tokens": [num for _, num in prefixes]})


def prepare():
    """In a warm instance, before its request arrives: the first pass through these paths costs two to three
    times a later one (json 0.9 against 0.4 ms, chat template and tokenization 1.4 against 0.6 ms on the 2-core
    CPU machine). Calls nothing that changes the engine's state or its counters."""
    info = _model_info()
    request = json.loads(_SAMPLE_REQUEST)
    prompts = [_prompt_ids(p, info) for p in request["prompts"]]
    max_tokens = _max_tokens(request, prompts, info)
    _generate_request(request, prompts[0], [], 0, info.page_size, max_tokens[0], 0, 0, None)
    _options(request)
    json.dumps({"type": "prompt", "prompt_tokens": [len(ids) for ids in prompts], "max_tokens": max_tokens})


def _model_info():
    global _info
    if _info is None:
        _info = model.info()
    return _info


def _prompt_ids(prompt, info):
    if "messages" in prompt:
        tools = prompt.get("tools")
        try:
            text = tokenize.apply_chat_template(json.dumps(prompt["messages"]),
                                                None if tools is None else json.dumps(tools),
                                                prompt.get("add_generation_prompt", True))
        except Err as error:
            raise RequestError(f"the chat template rejected the conversation: {error.value}", "messages")
        ids = tokenize.encode(text)
    elif "token_ids" in prompt:
        ids = list(prompt["token_ids"])
    else:
        ids = list(prompt.get("prefix_token_ids", [])) + tokenize.encode(prompt["text"])
    if not ids:
        if info.bos_token_id is None:
            raise RequestError("the prompt is empty", "prompt")
        ids = [info.bos_token_id]
    return ids


def _max_tokens(request, prompts, info):
    """Per prompt; 400 (vLLM's wording) when prompt + completion do not fit the model's context."""
    limit = info.max_context_len
    out = []
    for ids in prompts:
        wanted = request["max_tokens"]
        room = limit - len(ids)
        if room < 1 or (wanted is not None and wanted > room):
            asked = len(ids) + (wanted or 1)
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested {asked} "
                f"tokens ({len(ids)} in the messages, {wanted or 1} in the completion). Please reduce the "
                f"length of the messages or completion.", "messages", "context_length_exceeded")
        out.append(room if wanted is None else wanted)
    return out


def _constraint(spec):
    """None for free text; JSON output is decoded under the schema's grammar in the host."""
    if spec is None:
        return None
    if spec["type"] == "json_object":
        return generate.Constraint_JsonSchema(json.dumps({"type": "object"}))
    if spec["type"] == "json_schema":
        return generate.Constraint_JsonSchema(json.dumps(spec["schema"]))
    raise RequestError(f"unknown constraint {spec['type']!r}", "response_format")


def _options(request):
    """Detokenization as vLLM's request fields say (skip special tokens unless told not to); streamed deltas
    carry their tokens' logprobs when the request streams and asks for logprobs."""
    return generate.GenerateOptions(
        skip_special_tokens=request.get("skip_special_tokens", True),
        spaces_between_special_tokens=request.get("spaces_between_special_tokens", True),
        stream_logprobs=bool(request.get("stream")) and request["sampling"]["num_logprobs"] is not None)


def _prompt_logprobs(ids, k, page_size):
    """[[token_id, logprob, top k]] for ids[1:] (the first token has none): one forward over ids[:-1] with a
    sampled output per position, restricted to the actual next token (logprobs are taken before the mask,
    so the output's logprob is that token's and its top k the model's). The full pages are then published,
    so the generation that follows prefills only the unaligned tail again."""
    num = len(ids) - 1
    if num == 0:
        return []
    pages = _call(kv.allocate_pages, -(-num // page_size))
    try:
        outputs = [forward.OutputRequest(i, forward.OutputKind_Sample(_mask_to(ids[i + 1], k))) for i in range(num)]
        outs = _call(forward.forward, forward.ForwardRequest(
            token_ids=ids[:num], positions=list(range(num)), page_ids=pages,
            last_page_len=num - (len(pages) - 1) * page_size, attention_mask=None, outputs=outputs))
        aligned = num // page_size
        if aligned:
            try:
                prefix_cache.publish(ids[:aligned * page_size], pages[:aligned])
            except Err:
                pass  # an optimisation only
    finally:
        _call(kv.free_pages, pages)
    return [[ids[i + 1], out.logprob, [[t.token_id, t.logprob] for t in out.top_logprobs]]
            for i, out in enumerate(outs)]


def _mask_to(token_id, k):
    return types.SamplingParams(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, prompt_token_ids=[], output_token_ids=[], logit_bias=[],
        allowed_token_ids=[token_id], num_logprobs=k)


def _shared_prefix(ids, n, page_size):
    """(read-only pages holding ids[:num], num): page-aligned, never all of ids (the last token is what
    the first sample comes after). For n > 1 the aligned part is prefilled here once for all choices."""
    match = _call(prefix_cache.lookup, ids[:-1])
    pages, num = list(match.page_ids), match.num_tokens
    aligned = (len(ids) - 1) // page_size * page_size
    if n > 1 and aligned > num:
        new_pages = _call(kv.allocate_pages, (aligned - num) // page_size)
        _call(forward.forward, forward.ForwardRequest(
            token_ids=ids[num:aligned], positions=list(range(num, aligned)), page_ids=pages + new_pages,
            last_page_len=page_size, attention_mask=None, outputs=[]))
        pages, num = pages + new_pages, aligned
        _call(prefix_cache.publish, ids[:aligned], pages)
    return pages, num


def _generate_request(request, ids, pages, num_cached, page_size, max_tokens, channel, fork_index, constraint):
    sampling = request["sampling"]
    seed = sampling["seed"]
    return generate.GenerateRequest(
        page_ids=pages, last_page_len=page_size if pages else 0, input_token_ids=ids[num_cached:],
        position=num_cached,
        sampling=types.SamplingParams(
            temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
            min_p=sampling["min_p"], seed=None if seed is None else (seed + fork_index) % (1 << 64),
            presence_penalty=sampling["presence_penalty"], frequency_penalty=sampling["frequency_penalty"],
            repetition_penalty=sampling["repetition_penalty"], prompt_token_ids=ids, output_token_ids=[],
            logit_bias=[(int(t), float(b)) for t, b in sampling["logit_bias"]], allowed_token_ids=None,
            num_logprobs=sampling["num_logprobs"]),
        max_tokens=max_tokens, stop_token_ids=request["stop_token_ids"], stop_strings=request["stop"],
        ignore_eos=request["ignore_eos"], constraint=constraint, stream_channel=channel)


def _generate(requests, options):
    generations = []
    for i, result in enumerate(generate.generate_all_with(requests, options)):
        if not isinstance(result, Ok):
            raise RuntimeError(f"choice {i}: {result.value}")
        generations.append(result.value)
    return generations


def _publish(ids, generation, page_size):
    """Offer the full pages of prompt + output to the prefix cache (the next turn of a chat reuses them)."""
    tokens = ids + list(generation.token_ids)
    num_kv = len(tokens) - len(generation.pending_token_ids)
    num_full = min(num_kv // page_size, len(generation.page_ids))
    if num_full:
        try:
            prefix_cache.publish(tokens[:num_full * page_size], list(generation.page_ids[:num_full]))
        except Err:
            pass  # the cache is an optimisation; a refusal changes nothing for this request


def _choice(index, generation, request):
    logprobs = None
    if request["sampling"]["num_logprobs"] is not None:
        logprobs = [[p.token_id, p.logprob, [[t.token_id, t.logprob] for t in p.top_logprobs]]
                    for p in generation.logprobs]
    return {"index": index, "text": generation.text, "finish_reason": FINISH_REASONS[generation.finish_reason],
            "num_tokens": len(generation.token_ids), "logprobs": logprobs}


def _send(event):
    messaging.send_event(json.dumps(event))


def _call(fn, *args):
    try:
        return fn(*args)
    except Err as error:
        raise RuntimeError(f"{getattr(fn, '__name__', 'host call')}: {error.value}") from None

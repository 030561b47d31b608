"""text-completion: the simplest inferlet. Fills the prompt, generates, streams the text to the client.

    pie run text-completion.wasm -- --prompt "The capital of France is" --max-tokens 16

Preinstalled in the server under its folder name, it also serves OpenAI requests: with "model":
"inferlet:text-completion" the server launches it with one argument, the request as JSON, which
openai_request.py answers (a chat's messages through the chat template; the request's sampling, stop rules,
n and max_tokens).
"""
from pie_sdk import ArgumentParser, Context, Greedy, Sampler

import openai_request


def main(args: list[str]) -> None:
    request = openai_request.parse(args)
    if request is not None:
        openai_request.serve(request)
        return
    parser = ArgumentParser(prog="text-completion", description="Complete a prompt (greedy unless told).")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-tokens", type=int, default=64, help="at most this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    opts = parser.parse_args(args)
    if opts.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    sampler = Greedy() if opts.temperature == 0 else Sampler(temperature=opts.temperature, seed=opts.seed)
    with Context() as ctx:
        ctx.fill(opts.prompt)
        ctx.generate(opts.max_tokens, sampler=sampler, stream=True)

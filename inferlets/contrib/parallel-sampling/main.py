"""parallel-sampling (best-of-n): n samples of one prompt, sharing its KV pages; the best by mean logprob.

    pie run parallel-sampling.wasm -- --prompt "Once upon a time" --n 4 --max-tokens 32 --seed 7

The prompt is prefilled once; the n samples are the prompt's context and n - 1 forks of it (the forks
share its full pages, each gets a copy of the partly filled last page). They are generated in lockstep
by one host call (generate_all: their steps share the engine's batches), sample i with seed + i. Each
sample's score is the mean of its tokens' logprobs (the model's raw log-softmax, before temperature and
top-p; a final end-of-sequence token counts). The best sample's text goes to the client on channel 0,
then one event with every sample.
"""
from pie_sdk import ArgumentParser, Context, Sampler, generate_all, page_usage, send, send_event


def main(args: list[str]) -> None:
    parser = ArgumentParser(prog="parallel-sampling", description="Best-of-n sampling with shared prompt pages.")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--n", type=int, default=4, help="number of samples (1 to 64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="at most this many new tokens per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="makes the samples reproducible")
    opts = parser.parse_args(args)
    if not 1 <= opts.n <= 64:
        parser.error("--n must be in [1, 64]")
    if opts.max_tokens < 1 or opts.temperature <= 0:
        parser.error("--max-tokens must be at least 1 and --temperature above 0")
    sampler = Sampler(temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed, num_logprobs=0)
    prompt = Context()
    num_prompt_tokens = len(prompt.fill(opts.prompt))
    samples = [prompt] + [prompt.fork() for _ in range(opts.n - 1)]  # the first fork prefills the prompt
    shared = page_usage()
    generations = generate_all(samples, opts.max_tokens, sampler=sampler)
    generated = page_usage()
    scored = [{"text": g.text, "token_ids": list(g.token_ids), "finish_reason": g.finish_reason,
               "mean_logprob": sum(p.logprob for p in g.logprobs) / len(g.logprobs)} for g in generations]
    best = max(range(len(scored)), key=lambda i: (scored[i]["mean_logprob"], -i))
    send(scored[best]["text"])
    send_event({"best": best, "samples": scored, "num_prompt_tokens": num_prompt_tokens,
                "pages": {"after_fork": _counts(shared), "after_generation": _counts(generated)}})


def _counts(usage) -> dict:
    return {"num_page_ids": usage.num_page_ids, "num_physical_pages": usage.num_physical_pages,
            "num_shared_pages": usage.num_shared_pages}

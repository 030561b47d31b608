"""watermark: text with a statistical watermark (Kirchenbauer et al., 2023), and its detector.

    pie run watermark.wasm -- --prompt "Once upon a time" --max-tokens 64
    pie run watermark.wasm -- --detect "text to test"

A keyed hash of (previous token, token) puts about a --gamma fraction of the vocabulary on a "green list"
that changes with the previous token. Generation adds --delta to the green tokens' logprobs and takes the
best (greedy, --temperature 0) or samples among the --top-k likeliest (--temperature T). The greedy choice
is exact over the whole vocabulary: a token outside the top-k scores at most log p_k + delta, so when the
best of the top k does not beat that, the step is asked again (Context.rewind) with 4x the k.
The detector counts green tokens among the text's distinct (previous, token) pairs (repeats would
inflate the count) and reports z = (green - gamma T) / sqrt(T gamma (1 - gamma)); text written with the
same key scores high, other text about 0.
"""
import math
import random

from pie_sdk import ArgumentParser, Context, Decoder, decode, encode, model_info, send, send_event

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class GreenList:
    def __init__(self, key: int, gamma: float) -> None:
        self.key = key & MASK64
        self.gamma = gamma
        self.threshold = int(gamma * 2 ** 64)

    def is_green(self, prev_id: int, token_id: int) -> bool:
        return mix64(mix64(self.key ^ (prev_id << 20)) ^ token_id) < self.threshold

    def score(self, token_ids: list[int]) -> dict:
        """z-score of the tokens' distinct (previous, token) pairs (the first token has no previous)."""
        pairs = set(zip(token_ids, token_ids[1:]))
        num_green = sum(1 for prev_id, token_id in pairs if self.is_green(prev_id, token_id))
        num_scored = len(pairs)
        spread = math.sqrt(num_scored * self.gamma * (1 - self.gamma)) if num_scored else 1.0
        return {"z_score": (num_green - self.gamma * num_scored) / spread, "num_scored": num_scored,
                "num_green": num_green}


def main(args: list[str]) -> None:
    parser = ArgumentParser(prog="watermark", description="Watermarked generation (green lists) and detection.")
    parser.add_argument("--prompt", help="generate a watermarked continuation of this text")
    parser.add_argument("--detect", help="score this text instead of generating")
    parser.add_argument("--max-tokens", type=int, default=64, help="at most this many new tokens")
    parser.add_argument("--gamma", type=float, default=0.25, help="green fraction of the vocabulary, (0, 1)")
    parser.add_argument("--delta", type=float, default=2.0, help="added to green tokens' logprobs (>= 0)")
    parser.add_argument("--key", type=int, default=15485863, help="the watermark's secret key")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample the top-k")
    parser.add_argument("--top-k", type=int, default=64, help="tokens asked per step (greedy widens it)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--z-threshold", type=float, default=4.0, help="z above this: watermarked")
    opts = parser.parse_args(args)
    if (opts.prompt is None) == (opts.detect is None):
        parser.error("give exactly one of --prompt and --detect")
    if not 0 < opts.gamma < 1 or opts.delta < 0 or opts.temperature < 0 or opts.top_k < 1 or opts.max_tokens < 1:
        parser.error("need 0 < gamma < 1, delta >= 0, temperature >= 0, top-k >= 1, max-tokens >= 1")
    green = GreenList(opts.key, opts.gamma)
    if opts.detect is not None:
        report = green.score(encode(opts.detect))
    else:
        report = generate(opts, green)
    report["watermarked"] = report["z_score"] > opts.z_threshold
    send_event(report)


def generate(opts, green: GreenList) -> dict:
    info = model_info()
    eos_ids = set(info.eos_token_ids)
    rng = random.Random(opts.seed)
    ctx = Context()
    num_prompt = len(ctx.fill(opts.prompt))
    num_forwards = num_rewinds = 0
    with Decoder() as decoder:
        while len(ctx.token_ids) - num_prompt < opts.max_tokens:
            k = min(opts.top_k, info.vocab_size)
            while True:
                distribution = ctx.next_distribution(k)
                num_forwards += 1
                token_id = pick(distribution, ctx.token_ids[-1], green, opts, rng, k == info.vocab_size)
                if token_id is not None:
                    break
                ctx.rewind()  # the same position again, with a wider k
                num_rewinds += 1
                k = min(4 * k, info.vocab_size)
            ctx.append(token_id)
            if token_id in eos_ids:
                break
            send(decoder.add([token_id]))
        send(decoder.flush())
    output = ctx.token_ids[num_prompt:]
    report = green.score(ctx.token_ids[num_prompt - 1:])  # the last prompt token precedes the first
    report.update(token_ids=output, text=decode([t for t in output if t not in eos_ids]),
                  num_forward_calls=num_forwards, num_rewinds=num_rewinds)
    return report


def pick(distribution: list[tuple[int, float]], prev_id: int, green: GreenList, opts, rng: random.Random,
         whole_vocabulary: bool) -> int | None:
    """The next token, or None when the greedy choice needs a wider distribution."""
    scored = [(math.log(max(prob, 1e-45)) + (opts.delta if green.is_green(prev_id, token_id) else 0.0), token_id)
              for token_id, prob in distribution]
    if opts.temperature > 0:
        top = max(score for score, _ in scored)
        weights = [math.exp((score - top) / opts.temperature) for score, _ in scored]
        return rng.choices([token_id for _, token_id in scored], weights=weights)[0]
    best_score, best_id = max(scored, key=lambda s: (s[0], -s[1]))
    bound = math.log(max(distribution[-1][1], 1e-45)) + opts.delta  # the most any token left out can score
    return best_id if whole_vocabulary or best_score >= bound else None


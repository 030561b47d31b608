"""speculative-decoding: greedy decoding that guesses several tokens per forward pass (prompt lookup).

    pie run speculative-decoding.wasm -- --prompt "..." --max-tokens 64

The drafter is an n-gram lookup in the sequence itself (prompt and output so far): it finds the latest
earlier occurrence of the sequence's last n tokens (n = --ngram down to 1) and proposes the up to
--num-draft tokens that followed it. One forward pass (Context.decode_draft) then processes the pending
token and the draft with a greedy output after each, keeps the draft's longest prefix that agrees with
them plus the model's own next token, and drops the KV of the rest. The output is exactly greedy
decoding's; text that repeats itself (code, lists, quotes of the prompt) needs fewer forward passes than
tokens. --num-draft 0 decodes one token per pass (the baseline).
"""
from pie_sdk import ArgumentParser, Context, Decoder, model_info, send, send_event


def main(args: list[str]) -> None:
    parser = ArgumentParser(prog="speculative-decoding", description="Greedy decoding with prompt-lookup drafts.")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-tokens", type=int, default=64, help="at most this many new tokens")
    parser.add_argument("--ngram", type=int, default=3, help="longest n-gram the drafter matches (>= 1)")
    parser.add_argument("--num-draft", type=int, default=8, help="most tokens drafted per pass (0: no drafts)")
    opts = parser.parse_args(args)
    if opts.max_tokens < 1 or opts.ngram < 1 or opts.num_draft < 0:
        parser.error("need --max-tokens >= 1, --ngram >= 1 and --num-draft >= 0")
    eos_ids = set(model_info().eos_token_ids)
    ctx = Context()
    ctx.fill(opts.prompt)
    output: list[int] = []
    num_forwards = num_drafted = num_accepted = 0
    with Decoder() as decoder:
        while len(output) < opts.max_tokens and not (output and output[-1] in eos_ids):
            room = opts.max_tokens - len(output) - 1  # the pass adds one token beyond the kept draft
            draft = propose(ctx.token_ids, opts.ngram, min(opts.num_draft, room))
            kept = ctx.decode_draft(draft)
            num_forwards += 1
            num_drafted += len(draft)
            num_accepted += len(kept) - 1
            if any(t in eos_ids for t in kept):
                kept = kept[:next(i for i, t in enumerate(kept) if t in eos_ids) + 1]
            output.extend(kept)
            send(decoder.add([t for t in kept if t not in eos_ids]))
        send(decoder.flush())
    send_event({"token_ids": output, "num_tokens": len(output), "num_forward_calls": num_forwards,
                "num_drafted": num_drafted, "num_accepted": num_accepted})


def propose(token_ids: list[int], max_ngram: int, num_draft: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    if num_draft <= 0:
        return []
    for n in range(min(max_ngram, len(token_ids) - 1), 0, -1):
        pattern = token_ids[-n:]
        for start in range(len(token_ids) - n - 1, -1, -1):
            if token_ids[start:start + n] == pattern:
                return token_ids[start + n:start + n + num_draft]
    return []

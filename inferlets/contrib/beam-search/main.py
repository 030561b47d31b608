"""beam-search: the `--beams` most likely continuations of a prompt, by total log-probability.

    pie run beam-search.wasm -- --prompt "The capital of France is" --beams 3 --max-tokens 8

Every step asks the top 2 * beams next tokens of every live beam in ONE host call (next_distribution_all:
the beams' passes share one engine batch). Candidates are ranked by beam score + log p (ties: the earlier
beam, then the likelier token). Going down that list, an end-of-sequence token among the first `beams`
candidates finishes its beam; other candidates become the next beams until there are `beams` of them.
A beam chosen k times continues in its own context plus k - 1 forks (which share its full KV pages, no
copy); a beam not chosen is released. The search stops after --max-tokens steps or once `beams` beams
have finished. Finished and live beams are ranked by score / num_tokens ** length_penalty.
"""
import math

from pie_sdk import ArgumentParser, Context, decode, model_info, next_distribution_all, page_usage, send, send_event


class Beam:
    def __init__(self, ctx: Context, token_ids: list[int], score: float) -> None:
        self.ctx = ctx
        self.token_ids = token_ids  # generated so far
        self.score = score  # sum of the tokens' natural-log probabilities


def main(args: list[str]) -> None:
    parser = ArgumentParser(prog="beam-search", description="Beam search over the model's next-token logprobs.")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--beams", type=int, default=3, help="beam width (1 to 32)")
    parser.add_argument("--max-tokens", type=int, default=16, help="at most this many new tokens per beam")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="final ranking by score / num_tokens ** this (0: raw score)")
    opts = parser.parse_args(args)
    if not 1 <= opts.beams <= 32:
        parser.error("--beams must be in [1, 32]")
    if opts.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    eos_ids = set(model_info().eos_token_ids)
    root = Context()
    root.fill(opts.prompt)
    alive, finished = [Beam(root, [], 0.0)], []
    num_steps = num_shared_max = 0
    while alive and len(finished) < opts.beams and num_steps < opts.max_tokens:
        distributions = next_distribution_all([b.ctx for b in alive], 2 * opts.beams)
        num_steps += 1
        chosen, done = select(alive, distributions, opts.beams, eos_ids)
        finished.extend(done)
        alive = advance(alive, chosen)
        num_shared_max = max(num_shared_max, page_usage().num_shared_pages)
    usage = page_usage()
    ranked = sorted(finished + [(b.token_ids, b.score, False) for b in alive],
                    key=lambda r: -normalized(r[1], len(r[0]), opts.length_penalty))[:opts.beams]
    beams = [{"text": decode([t for t in ids if t not in eos_ids]), "token_ids": ids, "score": score,
              "normalized_score": normalized(score, len(ids), opts.length_penalty), "finished": is_done}
             for ids, score, is_done in ranked]
    send(beams[0]["text"])
    send_event({"beams": beams, "num_steps": num_steps, "num_forward_calls": num_steps,
                "pages": {"num_page_ids": usage.num_page_ids, "num_physical_pages": usage.num_physical_pages,
                          "num_shared_pages": usage.num_shared_pages, "max_shared_pages": num_shared_max,
                          "num_unshared_pages": sum(-(-b.ctx.kv_len // b.ctx.page_size) for b in alive)}})


def select(alive: list[Beam], distributions: list[list[tuple[int, float]]], width: int,
           eos_ids: set[int]) -> tuple[list[tuple[int, int, float]], list[tuple[list[int], float, bool]]]:
    """The next beams as (beam index, token, score), and the beams that finished at this step."""
    candidates = [(alive[i].score + math.log(max(prob, 1e-45)), i, rank, token_id)
                  for i, dist in enumerate(distributions) for rank, (token_id, prob) in enumerate(dist)]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen, done = [], []
    for position, (score, i, _rank, token_id) in enumerate(candidates):
        if token_id in eos_ids:
            if position < width:
                done.append((alive[i].token_ids + [token_id], score, True))
        else:
            chosen.append((i, token_id, score))
            if len(chosen) == width:
                break
    return chosen, done


def advance(alive: list[Beam], chosen: list[tuple[int, int, float]]) -> list[Beam]:
    """Contexts for the chosen beams: a parent's own context for its first child, forks for the others
    (made before any child appends its token); parents without children are released."""
    contexts: dict[int, list[Context]] = {}
    for i, beam in enumerate(alive):
        num_children = sum(1 for parent, _, _ in chosen if parent == i)
        if num_children == 0:
            beam.ctx.release()
        else:
            contexts[i] = [beam.ctx] + [beam.ctx.fork() for _ in range(num_children - 1)]
    beams = []
    for i, token_id, score in chosen:
        ctx = contexts[i].pop(0)
        ctx.append(token_id)
        beams.append(Beam(ctx, alive[i].token_ids + [token_id], score))
    return beams


def normalized(score: float, num_tokens: int, length_penalty: float) -> float:
    return score / max(num_tokens, 1) ** length_penalty

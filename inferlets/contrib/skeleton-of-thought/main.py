"""skeleton-of-thought (Ning et al., 2023): write a short skeleton of the answer first, then expand all its points
at once and assemble them in order.

    pie run skeleton-of-thought.wasm -- --question "How can I sleep better?"

1. Skeleton: the model lists 2..--max-points short numbered points. The list's shape is enforced by a regex
   constraint (numbered "1. ", "2. ", ... lines, each short), so even a small model gives a parseable skeleton.
2. Expansion: every point-expanding prompt starts with the same text (the question and the whole skeleton) and
   ends with its own point. That common prefix is prefilled once; each point is a fork of it (its full pages
   are shared, not copied) that adds only its own tail, and all the points are generated together by one
   generate_all, so their decode steps share the engine's batches.
3. Assembly: the answer is the points in order, one line each: "N. <point>: <expansion>" (an expansion ends at
   its first line break; its whitespace is collapsed to single spaces).

Channel 0 streams the skeleton, then the assembled answer; point i's expansion streams on channel i as it is
decoded. A final event carries the skeleton, each branch, the answer and the page accounting.
"""
from pie_sdk import (ArgumentParser, Context, Greedy, Regex, Sampler, apply_chat_template, generate_all, model_info,
                     send, send_event)

SKELETON_PROMPT = (
    "You're an organizer responsible for only giving the skeleton (not the full content) for answering the "
    "question. Provide the skeleton in a list of points (numbered 1., 2., 3., etc.) to answer the question. "
    "Instead of writing a full sentence, each skeleton point should be very short with only 3~5 words.\n\n"
    "Question: {question}")
# The paper's point-expanding prompt, shortened: SmolLM2-135M follows this one (measured with transformers).
EXPAND_PROMPT = ("Question: {question}\n\nOutline of the answer:\n{skeleton}\n\n"
                 "Explain point {index} in one or two sentences.")
POINT_CHARS = "[A-Za-z][A-Za-z0-9 ,'-]{2,%d}"


def main(args: list[str]) -> None:
    opts = _parse(args)
    points = _skeleton(opts)
    skeleton_text = "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))
    prompts = [_expansion_prompt(opts.question, skeleton_text, i, p) for i, p in enumerate(points, 1)]
    common, tails = _split_common(prompts)
    base = Context()
    base.fill(common)
    branches = [base.fork() for _ in points]  # the common prefix's full pages are shared by all branches
    shared_pages, common_tokens = base.kv_len // base.page_size, len(base.token_ids)
    base.release()  # the branches keep the shared pages
    for branch, tail in zip(branches, tails):
        branch.fill(tail)
    sampler = Greedy() if opts.temperature == 0 else Sampler(temperature=opts.temperature, seed=opts.seed)
    gens = generate_all(branches, opts.max_tokens, sampler=sampler, stop="\n",
                        stop_token_ids=model_info().stop_token_ids,
                        stream_channels=list(range(1, len(points) + 1)))
    expansions = [" ".join(gen.text.split()) for gen in gens]
    lines = [f"{i}. {p}: {e}" for i, (p, e) in enumerate(zip(points, expansions), 1)]
    answer = "\n".join(lines)
    send("\n\n" + answer)
    send_event({"skeleton": points, "answer": answer,
                "branches": [{"point": p, "expansion": e, "num_tokens": len(g.token_ids),
                              "finish_reason": g.finish_reason} for p, e, g in zip(points, expansions, gens)],
                "pages": {"page_size": base.page_size, "common_tokens": common_tokens,
                          "shared_pages": shared_pages, "branch_pages": [len(b.page_ids) for b in branches]}})


def _skeleton(opts) -> list[str]:
    """2..max_points short points, parsed from a regex-constrained list."""
    ctx = Context()
    ctx.fill(apply_chat_template([{"role": "user", "content": SKELETON_PROMPT.format(question=opts.question)}]))
    text = ctx.generate(opts.skeleton_tokens, constraint=Regex(_skeleton_regex(opts)),
                        stop_token_ids=model_info().stop_token_ids, stream=True)
    ctx.release()
    points = [line.split(". ", 1)[1].strip() for line in text.split("\n") if ". " in line]
    if len(points) < 2:
        raise ValueError(f"the skeleton has {len(points)} point(s) (raise --skeleton-tokens): {text!r}")
    return points[:opts.max_points]


def _skeleton_regex(opts) -> str:
    """Point 1's text, then "\\n2. text", ... with the numbers in order: at least 2 points, at most max_points."""
    point = POINT_CHARS % (opts.point_chars - 1)
    pattern = ""
    for index in range(opts.max_points, 2, -1):  # innermost (the last optional point) first
        pattern = f"(?:\\n{index}\\. {point}{pattern})?"
    return f"1\\. {point}\\n2\\. {point}{pattern}"


def _expansion_prompt(question: str, skeleton: str, index: int, point: str) -> str:
    user = EXPAND_PROMPT.format(question=question, skeleton=skeleton, index=index)
    return apply_chat_template([{"role": "user", "content": user}]) + f"{index}. {point}:"


def _split_common(prompts: list[str]) -> tuple[str, list[str]]:
    """The longest common prefix ending at a line break (so tokenizing it apart changes no token), and the
    tails."""
    common = prompts[0]
    for prompt in prompts[1:]:
        length = 0
        while length < min(len(common), len(prompt)) and common[length] == prompt[length]:
            length += 1
        common = common[:length]
    common = common[:common.rfind("\n") + 1]
    return common, [p[len(common):] for p in prompts]


def _parse(args: list[str]):
    parser = ArgumentParser(prog="skeleton-of-thought", description="Answer with a skeleton whose points are "
                            "expanded in parallel.")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-points", type=int, default=4, help="points in the skeleton at most (2..9)")
    parser.add_argument("--point-chars", type=int, default=40, help="characters per skeleton point at most")
    parser.add_argument("--skeleton-tokens", type=int, default=96, help="token budget of the skeleton")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per point expansion at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="of the expansions; 0: greedy")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    opts = parser.parse_args(args)
    if not 2 <= opts.max_points <= 9 or opts.point_chars < 4 or opts.skeleton_tokens < 1 or opts.max_tokens < 1:
        parser.error("--max-points in 2..9, --point-chars >= 4, --skeleton-tokens and --max-tokens >= 1")
    return opts

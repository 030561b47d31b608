"""A hostile test inferlet (and one well-behaved scenario to run beside it); each reports through JSON events.

    hostile good --prompt P --max-tokens N     greedy generate; reports the token ids (the control group)
    hostile flood --count N --size S [--char C]
                                               N text messages of S characters C (default x) as fast as it can,
                                               then {"sent": N}
    hostile hoard                              allocates one page at a time until refused, reports how many it
                                               got and why not, waits for a client message holding them, then
                                               fails with the refusal
    hostile bad-pages                          forward with a page id never allocated, with a freed one, and
                                               with ids that only another instance holds; reports each error
    hostile export --prompt P --name X         exports its prompt's pages, waits for a client message
    hostile import --name X                    imports the pages of export X (kv.import-pages); fails with
                                               the host's error if it may not
    hostile http --url U                       fetches a URL off the allow-list; fails with the error
    hostile fork-bomb --prompt P [--full-pages N]
                                               forks its context (the prompt, or N full pages of token 1: each
                                               fork then maps N page ids and takes no new page) until refused;
                                               reports the count, then fails
    hostile generate-oom --prompt P --contexts K --max-tokens N
                                               generate_all over K forks needing more pages than it may hold;
                                               reports the error, then generates once more (the instance lives)
"""
from wit_world.imports import forward, kv

import pie_sdk
from pie_sdk import ArgumentParser, Context, HostError, generate_all, receive, send, send_event


def main(args: list[str]) -> None:
    parser = ArgumentParser(prog="hostile")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--char", default="x")
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--full-pages", type=int, default=0)
    parser.add_argument("--name", default="hostile")
    parser.add_argument("--url", default="http://example.com/")
    opts = parser.parse_args(args)
    SCENARIOS[opts.scenario](opts)


def good(opts) -> None:
    ctx = Context()
    ctx.fill(opts.prompt)
    gen = ctx.generate_detailed(opts.max_tokens, ignore_eos=True, stream=False)
    send_event({"token_ids": list(gen.token_ids)})


def flood(opts) -> None:
    chunk = opts.char * opts.size
    for _ in range(opts.count):
        send(chunk)
    send_event({"sent": opts.count})


def hoard(opts) -> None:
    held = []
    try:
        while True:
            held += kv.allocate_pages(1)
    except Exception as exc:  # the binding raises Err(message)
        refusal = str(getattr(exc, "value", exc))
    send_event({"held": len(held), "error": refusal})
    receive()
    raise HostError(refusal)


def _forward_error(page_ids: list[int]) -> str | None:
    sample = forward.OutputKind_Sample(pie_sdk.Greedy().to_wit())
    request = forward.ForwardRequest(token_ids=[1], positions=[0], page_ids=page_ids, last_page_len=1,
                                     attention_mask=None, outputs=[forward.OutputRequest(0, sample)])
    try:
        forward.forward(request)
        return None
    except Exception as exc:
        return str(getattr(exc, "value", exc))


def bad_pages(opts) -> None:
    never = _forward_error([987654])
    [freed_id] = kv.allocate_pages(1)
    kv.free_pages([freed_id])
    freed = _forward_error([freed_id])
    # Ids are per instance: the next ids this instance would get are ones other instances hold right now.
    others = _forward_error([freed_id + 1, freed_id + 2])
    send_event({"never": never, "freed": freed, "others": others})


def export(opts) -> None:
    ctx = Context()
    ctx.fill(opts.prompt)
    send_event({"exported": pie_sdk.export_context(ctx, opts.name)})
    receive()
    pie_sdk.unexport_context(opts.name)


def import_(opts) -> None:
    page_ids = kv.import_pages(opts.name)  # the raw call: the host's own answer
    kv.free_pages(page_ids)
    send_event({"imported": len(page_ids)})


def http(opts) -> None:
    pie_sdk.fetch(opts.url)
    send_event({"fetched": opts.url})


def fork_bomb(opts) -> None:
    parent = Context()
    # + 1: the last token stays pending (flush writes the others' KV), so the KV fills whole pages.
    parent.fill([1] * (opts.full_pages * parent.page_size + 1) if opts.full_pages else opts.prompt)
    forks = []
    try:
        while True:
            forks.append(parent.fork())
    except HostError as exc:
        send_event({"forks": len(forks), "error": str(exc)})
        raise


def generate_oom(opts) -> None:
    parent = Context()
    parent.fill(opts.prompt)
    contexts = [parent, *(parent.fork() for _ in range(opts.contexts - 1))]
    try:
        generate_all(contexts, opts.max_tokens, ignore_eos=True)
        error = None
    except pie_sdk.PieError as exc:
        error = str(exc)
    for extra in contexts[1:]:
        extra.release()
    after = Context()
    after.fill(opts.prompt)
    send_event({"error": error, "after": list(after.generate_detailed(2, ignore_eos=True, stream=False).token_ids)})


SCENARIOS = {"good": good, "flood": flood, "hoard": hoard, "bad-pages": bad_pages, "export": export,
             "import": import_, "http": http, "fork-bomb": fork_bomb, "generate-oom": generate_oom}

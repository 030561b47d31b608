"""A test inferlet exercising pie_sdk against the real host; each scenario reports through JSON events.

    probe paths    --prompt P --max-tokens N   token ids from generate, generate_stepwise, decode_step and
                                               next_distribution (all greedy)
    probe fork     --prompt P --max-tokens N --forks K
                                               fork K times, report the page counts, wait for a client
                                               message, then generate on every context together
    probe prefix   --prompt P --max-tokens N   generate and publish, then reuse the prefix in a new context
    probe export   --prompt P --name X         export the prompt's pages, wait for a client message
    probe import   --name X --max-tokens N     continue the exported context
    probe constrained --prompt P               a regex and a JSON schema constraint on generate
    probe bad-page                             a call with a page id it does not own: a clear error, and the
                                               instance goes on
    probe fetch --url U --count N              starts N POSTs to U/0 .. U/N-1 at once (fetch_start), then waits
                                               for each; reports the bodies, the refused starts, and the errors of
                                               waiting on a used and on an unknown handle; ends with one more
                                               fetch started and never waited for
    probe heap                                 the guest's garbage collector: objects frozen at start-up, and
                                               whether a collection now still finds them
    probe fail                                 raises ValueError
"""
from wit_world.imports import http, kv

import pie_sdk
from pie_sdk import ArgumentParser, Context, HostError, generate_all, receive, send_event


def main(args: list[str]) -> None:
    parser = ArgumentParser(prog="probe")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--forks", type=int, default=2)
    parser.add_argument("--name", default="probe")
    parser.add_argument("--url", default="http://127.0.0.1/")
    parser.add_argument("--count", type=int, default=2)
    opts = parser.parse_args(args)
    SCENARIOS[opts.scenario](opts)


def paths(opts) -> None:
    coarse = Context()
    coarse.fill(opts.prompt)
    gen = coarse.generate_detailed(opts.max_tokens, ignore_eos=True, stream=False)
    stepwise = Context()
    stepwise.fill(opts.prompt)
    step_gen = stepwise.generate_stepwise(opts.max_tokens, ignore_eos=True, stream=False)
    stepped = Context()
    stepped.fill(opts.prompt)
    steps = [stepped.decode_step() for _ in range(opts.max_tokens)]
    by_distribution = Context()
    by_distribution.fill(opts.prompt)
    chosen = []
    for _ in range(opts.max_tokens):
        [(token_id, _prob)] = by_distribution.next_distribution(1)
        by_distribution.append(token_id)
        chosen.append(token_id)
    send_event({"generate": list(gen.token_ids), "text": gen.text, "stepwise": list(step_gen.token_ids),
                "stepwise_text": step_gen.text, "decode_step": steps, "distribution": chosen})


def fork(opts) -> None:
    parent = Context()
    parent.fill(opts.prompt)
    children = [parent.fork() for _ in range(opts.forks)]
    send_event({"kv_len": parent.kv_len, "page_size": parent.page_size,
                "pages": [len(c.page_ids) for c in [parent, *children]]})
    receive()
    gens = generate_all([parent, *children], opts.max_tokens, ignore_eos=True)
    send_event({"token_ids": [list(g.token_ids) for g in gens]})


def prefix(opts) -> None:
    first = Context()
    first.fill(opts.prompt)
    text = first.generate(opts.max_tokens, ignore_eos=True, stream=False)
    published = pie_sdk.publish_prefix(first)
    second = Context()
    cached = pie_sdk.fill_cached(second, opts.prompt)
    again = second.generate(opts.max_tokens, ignore_eos=True, stream=False)
    send_event({"published": published, "cached": cached, "text": text, "again": again})


def export(opts) -> None:
    ctx = Context()
    ctx.fill(opts.prompt)
    send_event({"exported": pie_sdk.export_context(ctx, opts.name)})
    receive()
    pie_sdk.unexport_context(opts.name)


def import_(opts) -> None:
    ctx = pie_sdk.import_context(opts.name)
    reused = ctx.kv_len
    text = ctx.generate(opts.max_tokens, ignore_eos=True, stream=False)
    send_event({"reused": reused, "text": text})


def constrained(opts) -> None:
    digits = Context()
    digits.fill(opts.prompt)
    number = digits.generate_detailed(16, constraint=pie_sdk.Regex("[0-9]{3}"), ignore_eos=True, stream=False)
    flag = Context()
    flag.fill(opts.prompt)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    value = flag.generate_detailed(32, constraint=pie_sdk.JsonSchema(schema), stream=False)
    send_event({"number": number.text, "number_finish": number.finish_reason, "json": value.text,
                "json_finish": value.finish_reason})


def bad_page(opts) -> None:
    try:
        kv.free_pages([987654])
        error = None
    except Exception as exc:  # the binding raises Err(message)
        error = str(getattr(exc, "value", exc))
    try:
        Context().fill([10 ** 9])
        value_error = None
    except ValueError as exc:
        value_error = str(exc)
    ctx = Context()
    ctx.fill(opts.prompt)
    send_event({"error": error, "value_error": value_error, "text": ctx.generate(2, stream=False)})


def fetch(opts) -> None:
    pending, refused = [], []
    for i in range(opts.count):
        try:
            pending.append(pie_sdk.fetch_start(f"{opts.url}/{i}", method="POST", body=str(i)))
        except HostError as error:
            refused.append(str(error))
    bodies = [p.wait().text for p in pending]
    send_event({"bodies": bodies, "refused": refused, "again": _wait_error(1), "unknown": _wait_error(987654)})
    pie_sdk.fetch_start(f"{opts.url}/last", method="POST", body="last")


def _wait_error(handle: int) -> str | None:
    try:
        http.fetch_wait(handle)
        return None
    except Exception as exc:  # the binding raises Err(message)
        return str(getattr(exc, "value", exc))


def heap(opts) -> None:
    import gc
    frozen = gc.get_freeze_count()
    gc.collect()
    send_event({"frozen": frozen, "frozen_after_collect": gc.get_freeze_count(), "tracked": len(gc.get_objects())})


def fail(opts) -> None:
    print("probe: about to fail")
    raise ValueError("probe failure")


SCENARIOS = {"paths": paths, "fork": fork, "prefix": prefix, "export": export, "import": import_,
             "constrained": constrained, "bad-page": bad_page, "fetch": fetch,
             "heap": heap, "fail": fail}

"""prefix-cache: a system prompt prefilled once, then shared by name.

    pie run prefix-cache.wasm -- --name support-bot --system "You are a helpful ..." --prompt "Hi!"

The first run prefills the system prompt and exports its full KV pages under --name (with its tokens, in the
tenant's key-value store); the export outlives the run. Later runs with the same name and system prompt
import those pages instead of prefilling them, then prefill only the rest (the system prompt's last partial
page and the user's message) and answer. Greedy by default, so a run that imported answers exactly as the
one that prefilled.

Invariant: an export is only used for the very tokens it holds; a run whose system prompt differs
("stale") prefills everything and leaves the export alone. `--drop` withdraws the export.
"""
import argparse

from pie_sdk import (ArgumentParser, Context, HostError, PieError, Sampler, apply_chat_template, encode,
                     export_context, import_context, model_info, send_event, unexport_context)


def main(args: list[str]) -> None:
    opts = _parse(args)
    if opts.drop:
        send_event({"type": "dropped", "name": opts.name, "existed": _drop(opts.name)})
        return
    system_ids, user_ids = _split_prompt(opts.system, opts.prompt)
    ctx, status = _import_or_prefill(opts.name, system_ids)
    num_reused = ctx.kv_len if status == "imported" else 0  # tokens whose KV came with the imported pages
    ctx.fill(user_ids)
    sampler = Sampler(temperature=opts.temperature, seed=opts.seed)
    gen = ctx.generate_detailed(opts.max_tokens, sampler=sampler, stop_token_ids=model_info().stop_token_ids,
                                stream=True)
    send_event({"type": "result", "name": opts.name, "export": status, "num_prompt_tokens": len(system_ids) +
                len(user_ids), "num_reused_tokens": num_reused,
                "num_prefilled_tokens": len(system_ids) + len(user_ids) - num_reused, "text": gen.text,
                "token_ids": list(gen.token_ids), "finish_reason": gen.finish_reason})


def _parse(args: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="prefix-cache", description="Answer after a system prompt shared by name.")
    parser.add_argument("--name", required=True, help="the export's name (per tenant)")
    parser.add_argument("--system", default="", help="the system prompt whose KV is shared")
    parser.add_argument("--prompt", default="", help="the user's message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--drop", action="store_true", help="withdraw the export and end")
    opts = parser.parse_args(args)
    if not opts.drop and not (opts.system and opts.prompt):
        parser.error("--system and --prompt are required (unless --drop)")
    if opts.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    return opts


def _drop(name: str) -> bool:
    """Withdraws the export; whether there was one."""
    try:
        unexport_context(name)
    except HostError:
        return False
    return True


def _split_prompt(system: str, prompt: str) -> tuple[list[int], list[int]]:
    """The chat-templated conversation as (system part, the rest). Each part is tokenized on its own, so the
    system part's tokens never depend on the user's message (a shared prefix must be the same tokens)."""
    head = apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
    full = apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    if not full.startswith(head):
        raise PieError("the chat template renders the system message differently when a user message follows")
    return encode(head), encode(full[len(head):])


def _import_or_prefill(name: str, system_ids: list[int]) -> tuple[Context, str]:
    """(a context holding system_ids, how it came to be: imported, exported, stale or unexported)."""
    try:
        imported = import_context(name)
    except PieError:  # nothing exported under this name (HostError is a PieError too)
        imported = None
    if imported is not None and imported.token_ids == system_ids:
        return imported, "imported"
    if imported is not None:
        imported.release()
    ctx = Context()
    ctx.fill(system_ids)
    if imported is not None:
        return ctx, "stale"
    try:
        export_context(ctx, name)  # computes the KV of the system prompt (but its last token) and shares it
    except PieError:  # shorter than a page, or another run exported the name first
        return ctx, "unexported"
    return ctx, "exported"

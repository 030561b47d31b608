"""attention-sink: StreamingLLM-style generation (Xiao et al., 2023) whose KV cache stays bounded however long
the text grows. Every token attends to the first --sink-tokens tokens of the sequence (the "attention sinks")
and to the most recent --window tokens or a little more (whole pages are dropped, so up to page_size - 1 more);
everything in between is freed.

    pie run attention-sink.wasm -- --prompt "Tell me a long story." --max-tokens 5000 --window 256

Layout of the context's pages (an invariant between chunks):
    [sink pages][window pages]
    sink pages: the first ceil(sink_tokens / page_size) pages of the sequence, never freed; once eviction has
        started, their slots past the first sink_tokens are hidden (kv.mask-slots).
    window pages: a contiguous run of the latest tokens; the oldest is freed (kv.free-pages) while the rest
        still hold at least --window tokens.
The host runs the decode loop (`generate`) for --chunk tokens at a time; pages are dropped between chunks.
RoPE positions keep counting; when they would reach --max-position (default: the model's limit) the window
is re-encoded right after the sinks ("rebase": its pages are freed and its tokens prefilled again at
positions sink_tokens, sink_tokens + 1, ...), so a generation can run for ever.
"""
from dataclasses import replace

from wit_world.imports import kv

from pie_sdk import (ArgumentParser, Context, Decoder, Greedy, Sampler, apply_chat_template, model_info, send,
                     send_event)


def main(args: list[str]) -> None:
    opts = _parse(args)
    info = model_info()
    ctx = Context(info)
    ctx.fill(apply_chat_template([{"role": "user", "content": opts.prompt}]) if opts.chat else opts.prompt)
    cache = SinkCache(ctx, opts.sink_tokens, opts.window, opts.max_position or info.max_context_len)
    cache.check_fits(opts.chunk)
    stop_ids = () if opts.ignore_eos else tuple(info.stop_token_ids)
    num_generated, finish_reason, num_chunks = 0, "length", 0
    with Decoder() as decoder:
        while num_generated < opts.max_tokens:
            cache.before_chunk(opts.chunk)
            first_index, visible_from = cache.next_index, cache.visible_from
            gen = ctx.generate_detailed(min(opts.chunk, opts.max_tokens - num_generated),
                                        sampler=_chunk_sampler(opts, num_chunks), stop_token_ids=stop_ids,
                                        ignore_eos=opts.ignore_eos, stream=False)
            num_chunks += 1
            num_generated += len(gen.token_ids)
            cache.after_chunk(gen.token_ids)
            text_ids = gen.token_ids if gen.finish_reason == "length" else gen.token_ids[:-1]  # not the eos
            _send(decoder.add(list(text_ids)))
            if opts.report_every and (num_chunks % opts.report_every == 0 or gen.finish_reason == "stop"):
                report = {"progress": cache.stats(), "generated": num_generated, "first_index": first_index,
                          "visible_from": visible_from, "token_ids": list(gen.token_ids)}
                if opts.logprobs:
                    report["logprobs"] = [p.logprob for p in gen.logprobs]
                send_event(report)
            if gen.finish_reason == "stop":
                finish_reason = "stop"
                break
        _send(decoder.flush())
    send_event({"done": True, "generated": num_generated, "finish_reason": finish_reason, **cache.stats()})


class SinkCache:
    """Keeps ctx's KV to the sink tokens and a window of the latest tokens (see the module docstring).

    Sequence indices count every token since the start, prompt included. `next_index` is the index of ctx's
    first pending token; `visible_from` the index of the first token after the sinks that the next chunk sees
    (every token before it except the sinks is gone). `recent_ids` are the latest tokens, pending ones last:
    the only token history kept (at most --window + page_size tokens before the pending ones), because a
    rebase prefills the last --window of them again.
    """

    def __init__(self, ctx: Context, sink_tokens: int, window: int, max_position: int) -> None:
        self.ctx, self.sink_tokens, self.window, self.max_position = ctx, sink_tokens, window, max_position
        self.page_size = ctx.page_size
        self.num_sink_pages = -(-sink_tokens // self.page_size)
        self.sink_slots = self.num_sink_pages * self.page_size
        self.next_index = 0
        self.visible_from = sink_tokens
        self.recent_ids = list(ctx.pending_ids)
        self.sinks_masked = False
        self.kv_len_before = 0
        self.num_evicted_pages = self.num_rebases = self.max_pages = 0

    def check_fits(self, chunk: int) -> None:
        """Positions must suffice for the prompt and a chunk, and for a rebased window and a chunk."""
        needed = max(len(self.ctx.pending_ids), self.sink_slots + self.window + 1) + chunk
        if needed >= self.max_position:
            raise ValueError(f"the prompt, --sink-tokens, --window and --chunk need positions up to {needed}, "
                             f"beyond the maximum {self.max_position} (lower them, or raise --max-position)")

    def before_chunk(self, num_new: int) -> None:
        """Rebase if the chunk's positions would run out, else drop the window pages it no longer needs."""
        ctx = self.ctx
        if ctx.next_position + len(ctx.pending_ids) + num_new >= self.max_position:
            self._rebase()
        while ctx.kv_len - self.sink_slots - self.page_size >= self.window:
            self._evict_oldest()
        self.kv_len_before = ctx.kv_len

    def after_chunk(self, new_ids: tuple[int, ...]) -> None:
        """Count what the chunk processed; bound the history kept here and in the context."""
        ctx = self.ctx
        self.next_index += ctx.kv_len - self.kv_len_before
        self.max_pages = max(self.max_pages, len(ctx.page_ids))
        keep = self.window + self.page_size + len(ctx.pending_ids)
        self.recent_ids = (self.recent_ids + list(new_ids))[-keep:]
        # The SDK's own history only feeds penalties (none here): bounded too, so the guest's memory is.
        ctx.token_ids, ctx.prompt_ids, ctx.output_ids = ctx.token_ids[-keep:], [], []

    def stats(self) -> dict:
        ctx = self.ctx
        return {"pages": len(ctx.page_ids), "kv_len": ctx.kv_len, "position": ctx.next_position,
                "max_pages": self.max_pages, "evicted_pages": self.num_evicted_pages, "rebases": self.num_rebases}

    def _evict_oldest(self) -> None:
        ctx = self.ctx
        self._mask_sinks()
        oldest = ctx.page_ids[self.num_sink_pages]
        kv.free_pages([oldest])
        del ctx.page_ids[self.num_sink_pages]
        ctx.kv_len -= self.page_size
        self.visible_from = max(self.visible_from, self.sink_slots) + self.page_size
        self.num_evicted_pages += 1

    def _mask_sinks(self) -> None:
        """Hide the slots of the last sink page past the sink tokens (once, before anything is evicted)."""
        if self.sinks_masked:
            return
        num_visible = self.sink_tokens - (self.num_sink_pages - 1) * self.page_size
        if num_visible < self.page_size:
            page_id = self.ctx.page_ids[self.num_sink_pages - 1]
            kv.mask_slots(page_id, [slot < num_visible for slot in range(self.page_size)])
        self.sinks_masked = True

    def _rebase(self) -> None:
        """Free the window pages and queue the last --window processed tokens again right after the sinks."""
        ctx = self.ctx
        self._mask_sinks()
        num_pending = len(ctx.pending_ids)
        refill = self.recent_ids[:len(self.recent_ids) - num_pending][-self.window:]
        window_pages = ctx.page_ids[self.num_sink_pages:]
        if window_pages:
            kv.free_pages(window_pages)
        del ctx.page_ids[self.num_sink_pages:]
        ctx.kv_len, ctx.next_position = self.sink_slots, self.sink_tokens
        ctx.pending_ids = refill + ctx.pending_ids
        self.next_index -= len(refill)
        self.visible_from = self.next_index
        self.num_rebases += 1


def _parse(args: list[str]):
    parser = ArgumentParser(prog="attention-sink", description="Generate for as long as you like in bounded "
                            "KV memory: sink tokens + a sliding window of recent tokens.")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens to generate at most")
    parser.add_argument("--sink-tokens", type=int, default=4, help="first tokens every token attends to")
    parser.add_argument("--window", type=int, default=256, help="latest tokens every token attends to (at least)")
    parser.add_argument("--chunk", type=int, default=0, help="tokens per host generate call (0: one page)")
    parser.add_argument("--max-position", type=int, default=0,
                        help="rebase before RoPE positions reach this (0: the model's maximum context)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    parser.add_argument("--report-every", type=int, default=0,
                        help="send a progress event every this many chunks (0: only the final one)")
    parser.add_argument("--logprobs", action="store_true", help="progress events carry each token's logprob")
    opts = parser.parse_args(args)
    for name in ("max_tokens", "sink_tokens", "window"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if opts.chunk < 0 or opts.max_position < 0 or opts.report_every < 0:
        parser.error("--chunk, --max-position and --report-every must not be negative")
    opts.chunk = opts.chunk or model_info().page_size
    return opts


def _send(text: str) -> None:
    if text:
        send(text)


def _chunk_sampler(opts, chunk_index: int) -> Sampler:
    """Each chunk is a new host call, so a seeded sampler gets seed + chunk index (no repeated randomness)."""
    num_logprobs = 0 if opts.logprobs else None
    if opts.temperature == 0:
        return Greedy(num_logprobs=num_logprobs)
    sampler = Sampler(temperature=opts.temperature, seed=opts.seed, num_logprobs=num_logprobs)
    return sampler if opts.seed is None else replace(sampler, seed=(opts.seed + chunk_index) % 2 ** 64)

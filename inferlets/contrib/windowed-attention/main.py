"""windowed-attention: sliding-window attention over the paged KV cache. Every token attends to exactly the
--window latest tokens, itself included (Longformer / Mistral style); older slots are hidden with
kv.mask-slots one by one as they fall out of the window, and a page is freed (kv.free-pages) as soon as all
its slots are out. The KV memory is therefore bounded by ceil(window / page_size) + 1 pages however long the
generation runs.

    pie run windowed-attention.wasm -- --prompt "Once upon a time" --max-tokens 5000 --window 128

The decode loop runs in the guest, one forward pass per token (the window moves by one slot per token, so the
mask changes every step); a prompt longer than the window is prefilled in one pass with a banded attention
mask. RoPE positions keep counting; when they would reach --max-position (default: the model's limit) the
window is re-encoded at positions 0, 1, ... ("rebase": its pages are freed and its --window - 1 latest tokens
prefilled again), so a generation can run for ever.
"""
from dataclasses import replace

from wit_world.imports import forward, kv

from pie_sdk import (ArgumentParser, Decoder, Greedy, Sampler, apply_chat_template, encode, model_info, send,
                     send_event)


def main(args: list[str]) -> None:
    opts = _parse(args)
    info = model_info()
    prompt_ids = encode(apply_chat_template([{"role": "user", "content": opts.prompt}]) if opts.chat
                        else opts.prompt)
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    window = SlidingWindow(opts.window, info.page_size, opts.max_position or info.max_context_len)
    stop_ids = set() if opts.ignore_eos else set(info.eos_token_ids) | set(info.stop_token_ids)
    num_logprobs = 0 if opts.logprobs else None
    sampler = Greedy(num_logprobs=num_logprobs) if opts.temperature == 0 else \
        Sampler(temperature=opts.temperature, seed=opts.seed, num_logprobs=num_logprobs)
    pending, num_generated, unreported, finish_reason = prompt_ids, 0, Unreported(opts.logprobs), "length"
    with Decoder() as decoder:
        while num_generated < opts.max_tokens:
            token_id, logprob = window.step(pending, _step_params(sampler, num_generated))
            num_generated += 1
            pending = [token_id]
            unreported.add(token_id, logprob)
            if token_id in stop_ids:
                finish_reason = "stop"
                break
            _send(decoder.add([token_id]))
            if opts.report_every and len(unreported.token_ids) == opts.report_every:
                send_event({"progress": window.stats(), "generated": num_generated, **unreported.take()})
            elif not opts.report_every:
                unreported.take()  # no history kept: the guest's memory stays bounded too
        _send(decoder.flush())
    send_event({"done": True, "generated": num_generated, "finish_reason": finish_reason, **window.stats(),
                **unreported.take()})


class Unreported:
    """The tokens (and logprobs, when asked for) generated since the last report."""

    def __init__(self, with_logprobs: bool) -> None:
        self.with_logprobs = with_logprobs
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []

    def add(self, token_id: int, logprob: float | None) -> None:
        self.token_ids.append(token_id)
        if self.with_logprobs:
            self.logprobs.append(logprob)

    def take(self) -> dict:
        report = {"token_ids": self.token_ids}
        if self.with_logprobs:
            report["logprobs"] = self.logprobs
        self.token_ids, self.logprobs = [], []
        return report


class SlidingWindow:
    """The KV of one sequence restricted to its latest `window` tokens.

    Invariants between steps: `page_ids` hold `kv_len` slots counted from slot 0 of page_ids[0] (all pages but
    the last are full); the first `num_hidden` of them (all in page_ids[0], so < page_size) are hidden;
    `recent_ids` are the tokens of the visible slots, oldest first (at most window - 1 of them after a step's
    masking); `position` is the RoPE position of the next token written.
    """

    def __init__(self, window: int, page_size: int, max_position: int) -> None:
        if window + 1 >= max_position:
            raise ValueError(f"--window {window} needs positions beyond the maximum {max_position}")
        self.window, self.page_size, self.max_position = window, page_size, max_position
        self.page_ids: list[int] = []
        self.kv_len = self.num_hidden = self.position = 0
        self.recent_ids: list[int] = []
        self.num_processed = self.num_freed_pages = self.num_rebases = self.max_pages = 0

    def step(self, token_ids: list[int], sampling) -> tuple[int, float | None]:
        """Write token_ids' KV (each token seeing only the window that ends at it); the sampled next token and
        its logprob (None unless the sampling asks for logprobs)."""
        if self.position + len(token_ids) >= self.max_position:
            self._rebase()
            token_ids = self.recent_ids + token_ids
            self.recent_ids = []
        self._hide_outside(self.kv_len - (self.window - 1))  # the first new token sees window - 1 old ones
        self._reserve(self.kv_len + len(token_ids))
        context_len = self.kv_len + len(token_ids)
        num_pages = -(-context_len // self.page_size)
        request = forward.ForwardRequest(
            token_ids=list(token_ids), positions=list(range(self.position, self.position + len(token_ids))),
            page_ids=self.page_ids[:num_pages], last_page_len=context_len - (num_pages - 1) * self.page_size,
            attention_mask=self._band(len(token_ids), context_len),
            outputs=[forward.OutputRequest(len(token_ids) - 1, forward.OutputKind_Sample(sampling))])
        [output] = forward.forward(request)
        self.kv_len, self.position = context_len, self.position + len(token_ids)
        self.num_processed += len(token_ids)
        self.recent_ids = (self.recent_ids + list(token_ids))[-self.window:]
        self.max_pages = max(self.max_pages, len(self.page_ids))
        return output.token_id, output.logprob

    def stats(self) -> dict:
        return {"pages": len(self.page_ids), "kv_len": self.kv_len, "visible": self.kv_len - self.num_hidden,
                "position": self.position, "max_pages": self.max_pages, "freed_pages": self.num_freed_pages,
                "rebases": self.num_rebases}

    def _hide_outside(self, num_old: int) -> None:
        """Hide the first num_old slots: free the pages that fall out whole, mask the rest of the first page."""
        while num_old >= self.page_size:
            kv.free_pages([self.page_ids[0]])
            del self.page_ids[0]
            self.kv_len -= self.page_size
            num_old -= self.page_size
            self.num_hidden = 0
            self.num_freed_pages += 1
        if num_old > self.num_hidden:
            kv.mask_slots(self.page_ids[0], [slot >= num_old for slot in range(self.page_size)])
            self.num_hidden = num_old

    def _band(self, num_tokens: int, context_len: int) -> list[list[bool]] | None:
        """An explicit mask when the new tokens reach past the window of one another (a long prefill), else
        None: causal attention with the hidden slots left out is exactly the window."""
        if num_tokens <= self.window:
            return None
        start = context_len - num_tokens
        return [[start + i - self.window < j <= start + i for j in range(context_len)] for i in range(num_tokens)]

    def _reserve(self, num_slots: int) -> None:
        missing = -(-num_slots // self.page_size) - len(self.page_ids)
        if missing > 0:
            self.page_ids.extend(kv.allocate_pages(missing))

    def _rebase(self) -> None:
        """Free every page; the caller prefills recent_ids (the window - 1 latest tokens) again from position 0."""
        if self.page_ids:
            kv.free_pages(self.page_ids)
        self.page_ids, self.kv_len, self.num_hidden, self.position = [], 0, 0, 0
        self.recent_ids = self.recent_ids[-(self.window - 1):] if self.window > 1 else []
        self.num_processed -= len(self.recent_ids)
        self.num_rebases += 1


def _parse(args: list[str]):
    parser = ArgumentParser(prog="windowed-attention", description="Generate with sliding-window attention in "
                            "bounded KV memory.")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens to generate at most")
    parser.add_argument("--window", type=int, default=256, help="tokens each token attends to, itself included")
    parser.add_argument("--max-position", type=int, default=0,
                        help="rebase before RoPE positions reach this (0: the model's maximum context)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    parser.add_argument("--report-every", type=int, default=0,
                        help="send a progress event every this many tokens (0: only the final one)")
    parser.add_argument("--logprobs", action="store_true", help="reports carry each token's logprob")
    opts = parser.parse_args(args)
    if opts.max_tokens < 1 or opts.window < 1:
        parser.error("--max-tokens and --window must be at least 1")
    if opts.max_position < 0 or opts.report_every < 0:
        parser.error("--max-position and --report-every must not be negative")
    return opts


def _step_params(sampler: Sampler, step: int):
    """One step's sampling record: a seeded sampler gets seed + step, so steps do not repeat their randomness."""
    if sampler.seed is not None:
        sampler = replace(sampler, seed=(sampler.seed + step) % 2 ** 64)
    return sampler.to_wit()


def _send(text: str) -> None:
    if text:
        send(text)

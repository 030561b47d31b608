"""Context: one token sequence and the KV pages that hold it.

State invariants (page_size = ps):
- `token_ids` is the whole sequence in order; its last `len(pending_ids)` tokens are *pending*: known, but
  their KV is not written yet. The KV of the others fills the first `kv_len` slots of `page_ids`
  (the first ceil(kv_len / ps) pages; a standard context has kv_len == len(token_ids) - len(pending_ids)).
- `next_position` is the RoPE position of the first pending token.
- A call that fails leaves the state as it was (pages allocated for it are freed again).

Work is lazy: `fill` only appends pending tokens; `generate`, `decode_step` and `next_distribution`
process them together with the step they need, in one host call. Pages are the instance's own virtual ids;
all of them are freed when the instance ends, so `release` only matters for long-running inferlets.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from componentize_py_types import Ok
from wit_world.imports import forward, generate, kv

from .constraints import Constraint
from .errors import PieError, call
from .generation import Generation, from_wit, request_for
from .model import ModelInfo, model_info
from .sampling import Greedy, Sampler
from .stop import StopCondition, StopTracker
from .messaging import MAIN_CHANNEL, send
from .tokenizer import Decoder, encode

GREEDY = Greedy()


class Context:
    def __init__(self, info: ModelInfo | None = None) -> None:
        self.info = info or model_info()
        self.page_size = self.info.page_size
        self.page_ids: list[int] = []
        self.token_ids: list[int] = []
        self.pending_ids: list[int] = []
        self.kv_len = 0
        self.next_position = 0
        # Penalty context: tokens the inferlet filled vs. tokens the model generated (multisets).
        self.prompt_ids: list[int] = []
        self.output_ids: list[int] = []

    def __repr__(self) -> str:
        return (f"Context(tokens={len(self.token_ids)}, pending={len(self.pending_ids)}, kv_len={self.kv_len}, "
                f"pages={len(self.page_ids)})")

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- building the sequence ------------------------------------------------------------------------

    def fill(self, text_or_ids: str | Sequence[int]) -> list[int]:
        """Append text (tokenized, no special tokens added) or token ids; returns the token ids added."""
        token_ids = self._as_ids(text_or_ids)
        self.token_ids.extend(token_ids)
        self.pending_ids.extend(token_ids)
        self.prompt_ids.extend(token_ids)
        return token_ids

    def flush(self) -> None:
        """Write the KV of every pending token but the last (kept to predict from) in one forward pass."""
        if len(self.pending_ids) > 1:
            self._forward(self.pending_ids[:-1], [])
            self.pending_ids = self.pending_ids[-1:]

    # -- coarse generation (the decode loop runs in the host) -----------------------------------------

    def generate(self, max_tokens: int = 256, *, sampler: Sampler = GREEDY, stop: str | Sequence[str] = (),
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, constraint: Constraint | None = None,
                 stream: bool | int = True) -> str:
        """Generate up to max_tokens after the sequence; returns the text (without the stop string/token).

        constraint: AllowedTokens, JsonSchema or Regex, enforced by the host at every step.
        stream: True sends text deltas to the client on channel 0 as they are decoded, an int on that
        channel, False not at all. One host call, whatever the number of tokens.
        """
        return self.generate_detailed(max_tokens, sampler=sampler, stop=stop, stop_token_ids=stop_token_ids,
                                      ignore_eos=ignore_eos, constraint=constraint, stream=stream).text

    def generate_detailed(self, max_tokens: int = 256, *, sampler: Sampler = GREEDY,
                          stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                          ignore_eos: bool = False, constraint: Constraint | None = None,
                          stream: bool | int = True) -> Generation:
        """Like generate, but returns the tokens, finish reason and logprobs too."""
        condition = StopCondition.of(max_tokens, stop, stop_token_ids, ignore_eos)
        request = self.generate_request(condition, sampler, constraint, stream)
        return self.absorb(call(generate.generate, request))

    def generate_request(self, condition: StopCondition, sampler: Sampler, constraint: Constraint | None,
                         stream: bool | int) -> generate.GenerateRequest:
        """The host request that continues this context (used by generate and generate_all)."""
        self._require_pending()
        self._check_room(len(self.pending_ids))
        num_used = self._num_used_pages(self.kv_len)
        return request_for(
            page_ids=self.page_ids[:num_used], last_page_len=self._last_page_len(self.kv_len, num_used),
            input_ids=self.pending_ids, position=self.next_position, condition=condition,
            sampling=sampler.to_wit(self.prompt_ids, self.output_ids), constraint=constraint,
            stream_channel=_channel(stream))

    def absorb(self, raw: generate.Generation) -> Generation:
        """Take over the pages and tokens of a finished host generation of this context."""
        spare = self.page_ids[self._num_used_pages(self.kv_len):]
        self.page_ids = list(raw.page_ids) + spare
        self.kv_len = (len(raw.page_ids) - 1) * self.page_size + raw.last_page_len if raw.page_ids else 0
        self.token_ids.extend(raw.token_ids)
        self.output_ids.extend(raw.token_ids)
        self.pending_ids = list(raw.pending_token_ids)
        self.next_position = raw.next_position
        return from_wit(raw)

    # -- fine-grained steps (one forward pass each) ---------------------------------------------------

    def decode_step(self, sampler: Sampler = GREEDY, allowed_token_ids: Sequence[int] | None = None) -> int:
        """Process the pending tokens and sample the next one (engine-side); it becomes pending."""
        self._require_pending()
        params = sampler.to_wit(self.prompt_ids, self.output_ids, allowed_token_ids)
        request = forward.OutputRequest(len(self.pending_ids) - 1, forward.OutputKind_Sample(params))
        [output] = self._forward(self.pending_ids, [request])
        if output.token_id is None:
            raise PieError("the host returned no token for a sample output")
        token_id = output.token_id
        self.token_ids.append(token_id)
        self.output_ids.append(token_id)
        self.pending_ids = [token_id]
        return token_id

    def next_distribution(self, k: int = 10) -> list[tuple[int, float]]:
        """Process the pending tokens; returns the top-k next-token distribution [(token_id, prob)],
        most likely first. Nothing is pending afterwards: `append` the token you choose."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._require_pending()
        request = forward.OutputRequest(len(self.pending_ids) - 1, forward.OutputKind_Distribution(k))
        [output] = self._forward(self.pending_ids, [request])
        self.pending_ids = []
        return [(p.token_id, p.prob) for p in output.distribution]

    def append(self, token_id: int) -> None:
        """Add a token the inferlet chose itself (counts as generated output for the penalties)."""
        [token_id] = self._as_ids([token_id])
        self.token_ids.append(token_id)
        self.pending_ids.append(token_id)
        self.output_ids.append(token_id)

    def generate_stepwise(self, max_tokens: int = 256, *, sampler: Sampler = GREEDY,
                          stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                          ignore_eos: bool = False, stream: bool | int = True) -> Generation:
        """generate() with the decode loop in the guest: one forward pass per token (the same stop rules).
        Slower than generate; a template for inferlets that need to act between tokens."""
        tracker = StopTracker(StopCondition.of(max_tokens, stop, stop_token_ids, ignore_eos),
                              self.info.eos_token_ids)
        channel = _channel(stream)
        new_ids: list[int] = []
        with Decoder() as decoder:
            while not tracker.finished:
                token_id = self.decode_step(sampler)
                new_ids.append(token_id)
                delta = "" if tracker.is_stop_token(token_id) else decoder.add([token_id])
                _maybe_send(tracker.add(token_id, delta), channel)
            _maybe_send(tracker.finish(decoder.flush()), channel)
        return Generation(text=tracker.text, token_ids=tuple(new_ids),
                          finish_reason=tracker.finish_reason or "length", logprobs=())

    # -- sharing ----------------------------------------------------------------------------------------

    def fork(self) -> "Context":
        """A copy that continues independently. The full pages are shared (no copy; they become read-only
        for both), the partly filled last page is copied into a new page of the child."""
        self.flush()
        num_full, num_partial = divmod(self.kv_len, self.page_size)
        child = Context(self.info)
        try:
            if num_full:
                child.page_ids = call(kv.share_pages, self.page_ids[:num_full])
            if num_partial:
                [page_id] = call(kv.allocate_pages, 1)
                child.page_ids.append(page_id)
                call(kv.copy_slots, self.page_ids[num_full], page_id, 0, 0, num_partial)
        except BaseException:
            child.release()
            raise
        child.kv_len, child.next_position = self.kv_len, self.next_position
        child.token_ids, child.pending_ids = list(self.token_ids), list(self.pending_ids)
        child.prompt_ids, child.output_ids = list(self.prompt_ids), list(self.output_ids)
        return child

    def release(self) -> None:
        """Free this context's pages (idempotent); the context is empty afterwards."""
        page_ids, self.page_ids = self.page_ids, []
        self.kv_len = self.next_position = 0
        self.token_ids, self.pending_ids, self.prompt_ids, self.output_ids = [], [], [], []
        if page_ids:
            call(kv.free_pages, page_ids)

    # -- internals --------------------------------------------------------------------------------------

    def _forward(self, token_ids: list[int], outputs: list[forward.OutputRequest]) -> list[forward.Output]:
        """One forward pass writing token_ids' KV after the cached ones; allocates the pages it needs."""
        self._check_room(len(token_ids))
        new_len = self.kv_len + len(token_ids)
        num_used = self._num_used_pages(new_len)
        new_page_ids = self._reserve_pages(num_used)
        request = forward.ForwardRequest(
            token_ids=list(token_ids), positions=list(range(self.next_position, self.next_position + len(token_ids))),
            page_ids=self.page_ids[:num_used], last_page_len=self._last_page_len(new_len, num_used),
            attention_mask=None, outputs=outputs)
        try:
            results = call(forward.forward, request)
        except BaseException:
            self._drop_pages(new_page_ids)
            raise
        self.kv_len = new_len
        self.next_position += len(token_ids)
        return results

    def _reserve_pages(self, num_pages: int) -> list[int]:
        missing = num_pages - len(self.page_ids)
        if missing <= 0:
            return []
        new_page_ids = call(kv.allocate_pages, missing)
        self.page_ids.extend(new_page_ids)
        return new_page_ids

    def _drop_pages(self, page_ids: list[int]) -> None:
        if page_ids:
            del self.page_ids[-len(page_ids):]
            call(kv.free_pages, page_ids)

    def _num_used_pages(self, num_slots: int) -> int:
        return -(-num_slots // self.page_size)

    def _last_page_len(self, num_slots: int, num_pages: int) -> int:
        return num_slots - (num_pages - 1) * self.page_size if num_pages else 0

    def _check_room(self, num_new: int) -> None:
        if self.kv_len + num_new > self.info.max_context_len:
            raise PieError(f"the context would hold {self.kv_len + num_new} tokens; the model's limit is "
                           f"{self.info.max_context_len}")

    def _require_pending(self) -> None:
        if not self.pending_ids:
            raise PieError("nothing to process: fill() or append() a token first")

    def _as_ids(self, text_or_ids: str | Sequence[int]) -> list[int]:
        token_ids = encode(text_or_ids) if isinstance(text_or_ids, str) else [int(t) for t in text_or_ids]
        bad = [t for t in token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.info.vocab_size}): {bad[:5]}")
        return token_ids


def generate_all(contexts: Sequence[Context], max_tokens: int = 256, *, sampler: Sampler = GREEDY,
                 stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                 constraint: Constraint | None = None,
                 stream_channels: Sequence[int] | None = None) -> list[Generation]:
    """Generate for several contexts (e.g. forks) in lockstep: their steps share the engine's batches.
    stream_channels: one client channel per context, or None to stream nothing. With a seeded sampler,
    context i samples with seed + i: forks differ, and the whole call is reproducible."""
    if stream_channels is not None and len(stream_channels) != len(contexts):
        raise ValueError("give one stream channel per context")
    condition = StopCondition.of(max_tokens, stop, stop_token_ids, ignore_eos)
    requests = [ctx.generate_request(condition, _nth_seed(sampler, i), constraint,
                                     False if stream_channels is None else stream_channels[i])
                for i, ctx in enumerate(contexts)]
    results = generate.generate_all(requests)
    generations: list[Generation] = []
    errors: list[str] = []
    for i, (ctx, result) in enumerate(zip(contexts, results)):
        if isinstance(result, Ok):
            generations.append(ctx.absorb(result.value))
        else:
            errors.append(f"context {i}: {result.value}")
    if errors:
        raise PieError("generate_all failed for " + "; ".join(errors))
    return generations


def _nth_seed(sampler: Sampler, i: int) -> Sampler:
    return sampler if sampler.seed is None else replace(sampler, seed=(sampler.seed + i) % 2 ** 64)


def _channel(stream: bool | int) -> int | None:
    if stream is True:
        return MAIN_CHANNEL
    if stream is False:
        return None
    if stream < 0:
        raise ValueError(f"stream channel must be >= 0, got {stream}")
    return int(stream)


def _maybe_send(text: str, channel: int | None) -> None:
    if text and channel is not None:
        send(text, channel)

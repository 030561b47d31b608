"""Context: one token sequence and the KV pages that hold it.

State invariants (page_size = ps):
- `token_ids` is the whole sequence in order; its last `len(pending_ids)` tokens are *pending*: known, but
  their KV is not written yet. The KV of the others fills the first `kv_len` slots of `page_ids`
  (the first ceil(kv_len / ps) pages; a standard context has kv_len == len(token_ids) - len(pending_ids)).
- `next_position` is the RoPE position of the first pending token.
- A call that fails leaves the state as it was (pages allocated for it are freed again).

Work is lazy: `fill` only appends pending tokens; `generate`, `decode_step`, `next_distribution` and
`decode_draft` process them together with the step they need, in one host call. Pages are the instance's own
virtual ids; all of them are freed when the instance ends, so `release` only matters for long-running
inferlets. `page_ids` may hold spare pages after the ones in use (reused by later steps).

Sharing: a page referenced more than once (a fork's full pages, imports, the prefix cache) is read-only.
A context only ever writes after `kv_len`, into its private partial page or new pages; `rewind` is the one
move back, and it copies a shared page it would write into (copy on write).
"""
from __future__ import annotations

from typing import Sequence

from wit_world.imports import forward, generate, kv, types

from .constraints import Constraint
from .errors import KV_EVICTED, HostError, PieError, call, is_kv_evicted
from .eviction import MAX_EVICTIONS, rest_after_eviction, too_many_evictions
from .generation import Generation, from_wit, joined, request_for
from .model import ModelInfo, model_info
from .pages import PageUsage, is_shared, page_usage
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
        gen = self.absorb(call(generate.generate, self.generate_request(condition, sampler, constraint, stream)))
        for _ in range(MAX_EVICTIONS):
            after = rest_after_eviction(gen, condition, constraint, _channel(stream) is not None)
            if after is None:
                return gen
            rest, over = after
            if over:
                self.forget_last(len(gen.token_ids))
            more = self.absorb(call(generate.generate, self.generate_request(rest, sampler, constraint, stream)))
            gen = more if over else joined(gen, more)
        raise too_many_evictions()

    def forget_last(self, num_tokens: int) -> None:
        """Drops the last num_tokens tokens, all pending (after an eviction: those of a generation that starts
        over)."""
        if num_tokens:
            if num_tokens > len(self.pending_ids):
                raise PieError("only pending tokens can be forgotten")
            del self.token_ids[-num_tokens:], self.pending_ids[-num_tokens:], self.output_ids[-num_tokens:]

    def generate_request(self, condition: StopCondition, sampler: Sampler, constraint: Constraint | None,
                         stream: bool | int) -> generate.GenerateRequest:
        """The host request that continues this context (used by generate and generate_all)."""
        self._require_pending()
        self.check_room(len(self.pending_ids))
        num_used = self._num_used_pages(self.kv_len)
        return request_for(
            page_ids=self.page_ids[:num_used], last_page_len=self._last_page_len(self.kv_len, num_used),
            input_ids=self.pending_ids, position=self.next_position, condition=condition,
            sampling=sampler.to_wit(self.prompt_ids, self.output_ids), constraint=constraint,
            stream_channel=_channel(stream))

    def absorb(self, raw: generate.Generation) -> Generation:
        """Take over the pages and tokens of a finished host generation of this context (after an eviction:
        its tokens, and every token pending again)."""
        if raw.finish_reason == types.FinishReason.EVICTED:
            self.lose_kv()  # every token pending, those it generated too
            for tokens in (self.token_ids, self.pending_ids, self.output_ids):
                tokens.extend(raw.token_ids)
            return from_wit(raw)
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
        [output] = self._forward(self.pending_ids, [self.sample_request(sampler, allowed_token_ids)])
        return self.take_sample(output)

    def next_distribution(self, k: int = 10) -> list[tuple[int, float]]:
        """Process the pending tokens; returns the top-k next-token distribution [(token_id, prob)], most
        likely first: the softmax of the raw logits (temperature 1, no penalties). k may be up to the
        vocabulary size (the whole distribution). Nothing is pending afterwards: `append` the token you
        choose, or `rewind()` to ask the same position again (a larger k, a sampler, a mask)."""
        [output] = self._forward(self.pending_ids, [self.distribution_request(k)])
        return self.take_distribution(output)

    def decode_draft(self, draft_ids: Sequence[int], sampler: Sampler = GREEDY) -> list[int]:
        """Speculative decoding's verification, in one forward pass: the pending tokens, then draft_ids (a
        guess of what follows), sampled after the last pending token and after each draft token. Keeps the
        longest prefix of the draft that agrees with the samples, plus the sample after it; returns those
        tokens (at least one; they are appended, the last one pending) and drops the KV of the rest.

        With Greedy() the tokens are exactly what as many decode_step() calls would give. With an unseeded
        temperature sampler each kept token is a sample of its position given the ones before (a draft token
        is kept only when the sampler drew it). A seeded sampler or penalties are refused: every position of
        one pass would share the seed's draw and the penalties' history."""
        draft = self._as_ids(draft_ids)
        if sampler.seed is not None or sampler.uses_context:
            raise ValueError("decode_draft takes a sampler without seed and penalties")
        self._require_pending()
        params = sampler.to_wit()
        first = len(self.pending_ids) - 1
        outputs = [forward.OutputRequest(first + j, forward.OutputKind_Sample(params)) for j in range(len(draft) + 1)]
        results = self._forward(self.pending_ids + draft, outputs)
        sampled = [self._sampled(output) for output in results]
        num_kept = 0
        while num_kept < len(draft) and draft[num_kept] == sampled[num_kept]:
            num_kept += 1
        num_dropped = len(draft) - num_kept  # their KV stays in the slots after kv_len, never read again
        self.kv_len -= num_dropped
        self.next_position -= num_dropped
        kept = draft[:num_kept] + [sampled[num_kept]]
        self.token_ids.extend(kept)
        self.output_ids.extend(kept)
        self.pending_ids = [kept[-1]]
        return kept

    def rewind(self, num_tokens: int = 1) -> None:
        """Forget the KV of the last num_tokens processed tokens: they become pending again, so the next step
        recomputes them and can ask their positions anew (after next_distribution: the same position with a
        larger k, a sampler or a mask). The tokens stay in the sequence. A page that must be written again
        and is shared (a fork's) is first copied into a private one. Costs the recomputation."""
        if not 0 <= num_tokens <= self.kv_len:
            raise ValueError(f"can rewind 0 to {self.kv_len} tokens, got {num_tokens}")
        if num_tokens:
            self._keep_slots(self.kv_len - num_tokens)
            num_pending = len(self.pending_ids) + num_tokens
            self.pending_ids = self.token_ids[len(self.token_ids) - num_pending:]
            self.kv_len -= num_tokens
            self.next_position -= num_tokens

    # -- the pieces of a step (batch.py assembles several contexts' steps into one host call) -------------

    def sample_request(self, sampler: Sampler, allowed_token_ids: Sequence[int] | None = None
                       ) -> forward.OutputRequest:
        """The output that samples after the last pending token."""
        self._require_pending()
        params = sampler.to_wit(self.prompt_ids, self.output_ids, allowed_token_ids)
        return forward.OutputRequest(len(self.pending_ids) - 1, forward.OutputKind_Sample(params))

    def distribution_request(self, k: int) -> forward.OutputRequest:
        """The output that returns the top-k distribution after the last pending token."""
        if not 1 <= k <= self.info.vocab_size:
            raise ValueError(f"k must be in [1, {self.info.vocab_size}] (the vocabulary size), got {k}")
        self._require_pending()
        return forward.OutputRequest(len(self.pending_ids) - 1, forward.OutputKind_Distribution(k))

    def take_sample(self, output: forward.Output) -> int:
        """Append the token a sample output drew (it becomes pending); returns it."""
        token_id = self._sampled(output)
        self.token_ids.append(token_id)
        self.output_ids.append(token_id)
        self.pending_ids = [token_id]
        return token_id

    def take_distribution(self, output: forward.Output) -> list[tuple[int, float]]:
        self.pending_ids = []
        return [(p.token_id, p.prob) for p in output.distribution]

    def page_usage(self) -> PageUsage:
        """The usage of the pages that hold this context's KV (shared ones are counted, see PageUsage)."""
        return page_usage(self.page_ids[:self._num_used_pages(self.kv_len)])

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
            try:
                call(kv.free_pages, page_ids)
            except HostError as error:
                if not is_kv_evicted(error):
                    raise

    def lose_kv(self) -> None:
        """The server dropped this instance's pages (KV evicted): every token becomes pending again, so the next
        step computes the whole context anew. Only a plain context (positions 0, 1, ... over its tokens) can."""
        if self.next_position != self.kv_len or self.kv_len + len(self.pending_ids) != len(self.token_ids):
            raise PieError(f"{KV_EVICTED}, and this context (its own positions) cannot be computed again")
        self.page_ids, self.kv_len, self.next_position = [], 0, 0
        self.pending_ids = list(self.token_ids)

    # -- internals --------------------------------------------------------------------------------------

    def _forward(self, token_ids: list[int], outputs: list[forward.OutputRequest]) -> list[forward.Output]:
        """One forward pass writing token_ids' KV after the cached ones; allocates the pages it needs. When the
        server evicted the instance's KV, the whole context is computed again first (in the same pass)."""
        num_before, lost = self.kv_len, False  # tokens computed before (token_ids start with the pending ones)
        for _ in range(MAX_EVICTIONS):
            try:
                if not lost:
                    return self._forward_once(token_ids, outputs)
                return self._forward_once(self.token_ids[:num_before] + token_ids, outputs, num_before)
            except HostError as error:
                if not is_kv_evicted(error):
                    raise
                self.lose_kv()
                lost = True
        raise too_many_evictions()

    def _forward_once(self, token_ids: list[int], outputs: list[forward.OutputRequest],
                      num_before: int = 0) -> list[forward.Output]:
        """The pass itself; outputs' indices count from token_ids[num_before] (tokens computed again come
        first)."""
        if num_before:
            outputs = [forward.OutputRequest(o.index + num_before, o.kind) for o in outputs]
        self._require_pending()
        self.check_room(len(token_ids))
        missing = self.num_missing_pages(len(token_ids))
        new_page_ids = call(kv.allocate_pages, missing) if missing else []
        self.page_ids.extend(new_page_ids)
        try:
            results = call(forward.forward, self.forward_request(token_ids, outputs))
        except BaseException:
            self.drop_pages(new_page_ids)
            raise
        self.advance(len(token_ids))
        return results

    def num_missing_pages(self, num_new: int) -> int:
        """Pages to allocate before num_new more tokens' KV fits."""
        return max(0, self._num_used_pages(self.kv_len + num_new) - len(self.page_ids))

    def forward_request(self, token_ids: list[int], outputs: list[forward.OutputRequest]) -> forward.ForwardRequest:
        """The pass that writes token_ids after the kv_len cached slots (the pages must be there)."""
        new_len = self.kv_len + len(token_ids)
        num_used = self._num_used_pages(new_len)
        return forward.ForwardRequest(
            token_ids=list(token_ids), positions=list(range(self.next_position, self.next_position + len(token_ids))),
            page_ids=self.page_ids[:num_used], last_page_len=self._last_page_len(new_len, num_used),
            attention_mask=None, outputs=outputs)

    def advance(self, num_tokens: int) -> None:
        """After a successful forward_request pass of num_tokens tokens."""
        self.kv_len += num_tokens
        self.next_position += num_tokens

    def drop_pages(self, page_ids: list[int]) -> None:
        """Give back page_ids, the last ones of self.page_ids, allocated for a pass that failed."""
        if page_ids:
            del self.page_ids[-len(page_ids):]
            call(kv.free_pages, page_ids)

    def _keep_slots(self, num_slots: int) -> None:
        """Make the pages ready for writes from slot num_slots on: the pages after the one holding it are
        freed; that one, when shared, is replaced by a private copy of its first slots."""
        num_kept = self._num_used_pages(num_slots)
        offset = num_slots - (num_kept - 1) * self.page_size if num_kept else 0
        replace_last = offset < self.page_size and num_kept > 0 and is_shared(self.page_ids[num_kept - 1])
        if replace_last:
            [private] = call(kv.allocate_pages, 1)
            try:
                call(kv.copy_slots, self.page_ids[num_kept - 1], private, 0, 0, offset)
            except BaseException:
                call(kv.free_pages, [private])
                raise
            shared, self.page_ids[num_kept - 1] = self.page_ids[num_kept - 1], private
            call(kv.free_pages, [shared])
        spare, self.page_ids = self.page_ids[num_kept:], self.page_ids[:num_kept]
        if spare:
            call(kv.free_pages, spare)

    def _num_used_pages(self, num_slots: int) -> int:
        return -(-num_slots // self.page_size)

    def _last_page_len(self, num_slots: int, num_pages: int) -> int:
        return num_slots - (num_pages - 1) * self.page_size if num_pages else 0

    def check_room(self, num_new: int) -> None:
        if self.kv_len + num_new > self.info.max_context_len:
            raise PieError(f"the context would hold {self.kv_len + num_new} tokens; the model's limit is "
                           f"{self.info.max_context_len}")

    def _sampled(self, output: forward.Output) -> int:
        if output.token_id is None:
            raise PieError("the host returned no token for a sample output")
        return output.token_id

    def _require_pending(self) -> None:
        if not self.pending_ids:
            raise PieError("nothing to process: fill() or append() a token first")

    def _as_ids(self, text_or_ids: str | Sequence[int]) -> list[int]:
        token_ids = encode(text_or_ids) if isinstance(text_or_ids, str) else [int(t) for t in text_or_ids]
        bad = [t for t in token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.info.vocab_size}): {bad[:5]}")
        return token_ids


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

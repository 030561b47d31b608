"""Host functions of the lean per-token path of `forward`: register-sampler, drop-sampler, forward-tokens.

A forward-request carries a 13-field sampling record per output; lifting, decoding and validating it on
every step cost ~5x the rest of a call. Here the params are checked once (register-sampler) and each step
passes only flat u32 lists (decoded in one pass, values_compiled.compile_args) and a sampler id; the call
waits on the control's Future directly (the scheduler's lean wait, no generator), and the sampled tokens
go back through a pre-built result buffer. docs/decisions/execution-model.md has the measurements.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Sequence

from pie_server.engine.control.api import VirtualForward
from pie_server.engine.step import CommandResult, OutputSpec, SamplingParams
from pie_server.engine.runtime.api_forward import as_sampling, sampling_params_schema
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import GuestError, HostFunction, expect
from pie_server.engine.runtime.instance import InstanceState

MAX_SAMPLERS_PER_INSTANCE = 1024
MAX_CACHED_OUTPUT_SPECS = 256  # per instance: (sampler, output indices) -> OutputSpecs
TOKENS_RESULT = ("result", ("list", "u32"), "string")
U32_LIST = ("list", "u32")


class SamplerTable:
    """One instance's registered samplers (id -> SamplingParams), and the OutputSpec tuples already built
    for a (sampler, output indices) pair: a decode loop asks for the same one at every step."""

    def __init__(self) -> None:
        self._params: dict[int, SamplingParams] = {}
        self.specs: dict[tuple[int, Sequence[int]], tuple[OutputSpec, ...]] = {}
        self._next_id = 0

    def register(self, params: SamplingParams) -> int:
        expect(len(self._params) < MAX_SAMPLERS_PER_INSTANCE,
               f"at most {MAX_SAMPLERS_PER_INSTANCE} live samplers per instance")
        sampler_id, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFFFFFF
        while sampler_id in self._params:  # after 2^32 registrations ids wrap around
            sampler_id, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFFFFFF
        self._params[sampler_id] = params
        return sampler_id

    def drop(self, sampler_id: int) -> None:
        if self._params.pop(sampler_id, None) is not None:
            self.specs = {key: specs for key, specs in self.specs.items() if key[0] != sampler_id}

    def build_specs(self, sampler_id: int, indices: Sequence[int]) -> tuple[OutputSpec, ...]:
        params = self._params.get(sampler_id)
        expect(params is not None, f"sampler {sampler_id} is not registered")
        if len(self.specs) >= MAX_CACHED_OUTPUT_SPECS:
            self.specs.clear()
        specs = self.specs[(sampler_id, indices)] = tuple(OutputSpec(index=i, sampling=params) for i in indices)
        return specs


def sampled_tokens(result: CommandResult) -> tuple[str, list[int]]:
    """forward-tokens' value from the step's result: the sampled token of each output."""
    return ("ok", [output.token_id for output in result.outputs])


def explain_bad_forward(token_ids: Sequence[int], positions: Sequence[int], page_ids: Sequence[int],
                        last_page_len: int, host: Host) -> GuestError:
    """The precise complaint about a forward that failed the combined check of forward-tokens."""
    page_size, model = host.model.page_size, host.model
    context_len = (len(page_ids) - 1) * page_size + last_page_len
    if not token_ids:
        return GuestError("a forward needs at least one token")
    if len(positions) != len(token_ids):
        return GuestError("positions and token-ids must have the same length")
    if not page_ids:
        return GuestError("a forward needs at least one page")
    if not 0 < last_page_len <= page_size:
        return GuestError(f"last-page-len must be in [1, {page_size}]")
    if len(token_ids) > context_len:
        return GuestError("the pages (up to last-page-len) must hold all token-ids")
    if context_len > model.max_context_len:
        return GuestError(f"context exceeds {model.max_context_len} tokens")
    if max(token_ids) >= model.vocab_size:
        return GuestError(f"token id {max(token_ids)} is outside the vocabulary (size {model.vocab_size})")
    return GuestError("a position exceeds the model's max context")


def functions(host: Host) -> list[HostFunction]:
    control, model = host.control, host.model
    page_size, vocab_size, max_context_len = model.page_size, model.vocab_size, model.max_context_len
    tables: dict[InstanceState, SamplerTable] = {}

    def table_of(inst: InstanceState) -> SamplerTable:
        table = tables.get(inst)
        if table is None:
            table = tables[inst] = SamplerTable()
            inst.on_exit.append(lambda state: tables.pop(state, None))
        return table

    def register_sampler(inst: InstanceState, params: Any) -> tuple[str, int]:
        sampling = as_sampling(params, vocab_size)
        expect(sampling.num_logprobs is None, "a sampler for forward-tokens needs num-logprobs none "
               "(forward-tokens returns token ids only; use forward for logprobs)")
        return ("ok", table_of(inst).register(sampling))

    def drop_sampler(inst: InstanceState, sampler_id: int) -> None:
        table = tables.get(inst)
        if table is not None:
            table.drop(sampler_id)

    def forward_tokens(inst: InstanceState, token_ids: tuple[int, ...], positions: tuple[int, ...],
                       page_ids: tuple[int, ...], last_page_len: int, output_indices: tuple[int, ...],
                       sampler_id: int) -> Future:
        num_tokens = len(token_ids)
        context_len = (len(page_ids) - 1) * page_size + last_page_len
        # one combined check on the hot path (the same rules as forward's); the message comes after
        if not (0 < num_tokens == len(positions) and page_ids and 0 < last_page_len <= page_size
                and num_tokens <= context_len <= max_context_len and max(token_ids) < vocab_size
                and max(positions) < max_context_len):
            raise explain_bad_forward(token_ids, positions, page_ids, last_page_len, host)
        outputs: tuple[OutputSpec, ...] = ()
        if output_indices:
            expect(max(output_indices) < num_tokens,
                   f"output index {max(output_indices)} is not among the {num_tokens} tokens")
            table = tables.get(inst)
            if table is None:
                table = table_of(inst)
            outputs = table.specs.get((sampler_id, output_indices)) or table.build_specs(sampler_id, output_indices)
        command = VirtualForward(token_ids=token_ids, positions=positions, page_ids=page_ids,
                                 last_page_len=last_page_len, outputs=outputs)
        return control.forward(inst.id, command)  # a lean wait: sampled_tokens() makes the value

    return [
        HostFunction("forward", "register-sampler", register_sampler, ("result", "u32", "string"),
                     (sampling_params_schema(vocab_size),), needs_context=False),
        HostFunction("forward", "drop-sampler", drop_sampler, None, ("u32",), needs_context=False),
        HostFunction("forward", "forward-tokens", forward_tokens, TOKENS_RESULT,
                     (U32_LIST, U32_LIST, U32_LIST, "u32", U32_LIST, "u32"),
                     needs_context=False, finish=sampled_tokens),
    ]

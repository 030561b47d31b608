"""Host functions of `tokenize`, including the `decoder` resource (reps are global, owned per instance)."""
from __future__ import annotations

import ctypes
import itertools
import json
from typing import Any

from wasmtime import StoreContext, WasmtimeError, _ffi as ffi
from wasmtime.component import ResourceHost

from pie_server.engine.runtime.api_kv import check_token_ids
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import GuestError, HostFunction, expect
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.values import ResourceRef

DECODER_TYPE_ID = 0x7069_6501  # host resource type id of tokenize.decoder
MAX_DECODERS_PER_INSTANCE = 1024
STRING_RESULT = ("result", "string", "string")
_reps = itertools.count(1)


def new_resource(inst: InstanceState, rep: int) -> ResourceRef:
    """An owned handle of a host resource for the guest (valid during the current host call)."""
    handle = ResourceHost.own(rep, DECODER_TYPE_ID).to_any(StoreContext(inst.context_ptr))
    return ResourceRef(ctypes.cast(handle._consume(), ctypes.c_void_p).value or 0)


def resource_rep(inst: InstanceState, ref: ResourceRef) -> int:
    out = ctypes.POINTER(ffi.wasmtime_component_resource_host_t)()
    pointer = ctypes.cast(ctypes.c_void_p(ref.address), ctypes.POINTER(ffi.wasmtime_component_resource_any_t))
    error = ffi.wasmtime_component_resource_any_to_host(inst.context_ptr, pointer, ctypes.byref(out))
    if error:
        raise GuestError(f"not a decoder: {WasmtimeError._from_ptr(error)}")
    try:
        return int(ffi.wasmtime_component_resource_host_rep(out))
    finally:
        ffi.wasmtime_component_resource_host_delete(out)


def functions(host: Host) -> list[HostFunction]:
    tokenizer, vocab_size = host.tokenizer, host.model.vocab_size

    def decode(inst: InstanceState, token_ids: list[int]) -> tuple[str, str]:
        check_token_ids(token_ids, vocab_size)
        return ("ok", tokenizer.decode(token_ids))

    def apply_chat_template(inst: InstanceState, messages_json: str, tools_json: str | None,
                            add_generation_prompt: bool) -> tuple[str, str]:
        try:
            messages = json.loads(messages_json)
            tools = None if tools_json is None else json.loads(tools_json)
        except ValueError as error:
            raise GuestError(f"invalid JSON: {error}") from None
        expect(isinstance(messages, list) and all(isinstance(m, dict) for m in messages),
               "messages-json must be a JSON array of objects")
        expect(tools is None or (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)),
               "tools-json must be a JSON array of objects")
        try:
            return ("ok", tokenizer.apply_chat_template(messages, tools, add_generation_prompt))
        except Exception as error:  # a template error is the guest's input problem, not a host bug
            raise GuestError(f"chat template failed: {error}") from None

    def decoder_new(inst: InstanceState) -> ResourceRef:
        if len(inst.decoder_reps) >= MAX_DECODERS_PER_INSTANCE:
            raise RuntimeError(f"more than {MAX_DECODERS_PER_INSTANCE} live decoders")
        rep = next(_reps)
        host.decoders[rep] = (inst, tokenizer.new_decoder())
        inst.decoder_reps.add(rep)
        return new_resource(inst, rep)

    def own_decoder(inst: InstanceState, ref: ResourceRef) -> Any:
        entry = host.decoders.get(resource_rep(inst, ref))
        if entry is None or entry[0] is not inst:
            raise RuntimeError("unknown decoder handle")
        return entry[1]

    def decoder_add(inst: InstanceState, ref: ResourceRef, token_ids: list[int]) -> tuple[str, str]:
        check_token_ids(token_ids, vocab_size)
        return ("ok", own_decoder(inst, ref).add(token_ids))

    return [
        HostFunction("tokenize", "encode", lambda inst, text: tokenizer.encode(text), ("list", "u32")),
        HostFunction("tokenize", "decode", decode, STRING_RESULT),
        HostFunction("tokenize", "apply-chat-template", apply_chat_template, STRING_RESULT),
        HostFunction("tokenize", "vocabulary", lambda inst: tokenizer.vocabulary(), ("list", ("list", "u8"))),
        HostFunction("tokenize", "[constructor]decoder", decoder_new, ("own",)),
        HostFunction("tokenize", "[method]decoder.add", decoder_add, STRING_RESULT),
        HostFunction("tokenize", "[method]decoder.flush", lambda inst, ref: own_decoder(inst, ref).flush(), "string"),
    ]


def drop_decoder(host: Host, rep: int) -> None:
    """The resource destructor: the guest dropped its handle."""
    entry = host.decoders.pop(rep, None)
    if entry is not None:
        entry[0].decoder_reps.discard(rep)


def drop_instance_decoders(host: Host, inst: InstanceState) -> None:
    for rep in list(inst.decoder_reps):
        host.decoders.pop(rep, None)
    inst.decoder_reps.clear()

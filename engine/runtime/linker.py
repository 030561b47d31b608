"""Assembles the component Linker: WASI p2 (async; no preopened dirs, no sockets allowed) plus every
`pie:inferlet` import, each served by the scheduler's C callback."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import wasmtime
from wasmtime.component import Linker, ResourceType

from pie_server.engine.runtime import (
    api_basic, api_forward, api_forward_lean, api_generate, api_http, api_kv, api_tokenize, ffi_async,
)
from pie_server.engine.runtime.host import Host
from pie_server.engine.runtime.hostfn import HostFunction


def host_functions(host: Host) -> list[HostFunction]:
    modules = (api_basic, api_kv, api_forward, api_forward_lean, api_generate, api_tokenize, api_http)
    return [fn for module in modules for fn in module.functions(host)]


def build_linker(engine: wasmtime.Engine, host: Host, make_callback: Callable[[HostFunction], Any]) -> tuple[Linker, list[Any]]:
    """Returns the linker and the C callback objects, which must live as long as the linker."""
    linker = Linker(engine)
    ffi_async.add_wasip2_async(linker)
    keep_alive: list[Any] = []
    functions = sorted(host_functions(host), key=lambda f: f.instance_name)
    with linker.root() as root:
        for instance_name, group in itertools.groupby(functions, key=lambda f: f.instance_name):
            with root.add_instance(instance_name) as instance:
                _define(instance, list(group), host, make_callback, keep_alive)
    return linker, keep_alive


def _define(instance: Any, functions: Iterable[HostFunction], host: Host,
            make_callback: Callable[[HostFunction], Any], keep_alive: list[Any]) -> None:
    functions = list(functions)
    if any(f.name.endswith("]decoder") or ".decoder" in f.name or "]decoder." in f.name for f in functions):
        instance.add_resource("decoder", ResourceType.host(api_tokenize.DECODER_TYPE_ID),
                              lambda _store, rep: api_tokenize.drop_decoder(host, rep))
    for fn in functions:
        callback = make_callback(fn)
        keep_alive.append(callback)
        ffi_async.add_async_func(instance, fn.name, callback)

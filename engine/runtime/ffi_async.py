"""The slice of wasmtime's async C API the scheduler uses, reached through `wasmtime._ffi`.

This is private API of wasmtime-py, so the version is pinned exactly and checked here; tests cover every
function below. Facts (wasmtime 50 C API):
- an async host function's callback runs inside `wasmtime_call_future_poll`; it must set a continuation.
  wasmtime polls the continuation (a C callback returning true when done) on every later poll of the call
  future, and reads the results array only once the continuation returned true;
- `wasmtime_call_future_poll` returns true when the call finished (results/error written), false when the
  guest is suspended (in a pending host call, or at an epoch yield point);
- deleting an unfinished call future cancels the guest's execution (its fiber is dropped).
Object lifetimes are ours: every CFUNCTYPE object handed to C is kept alive in module/linker scope.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, byref
from typing import Any, Callable

import wasmtime
from wasmtime import WasmtimeError, _ffi as ffi
from wasmtime.component import Component, Linker

PINNED_WASMTIME = "50.0.1"


def check_wasmtime_version() -> None:
    from importlib.metadata import version
    found = version("wasmtime")
    if found != PINNED_WASMTIME:
        raise RuntimeError(f"engine.runtime uses wasmtime's private async C API and needs wasmtime=={PINNED_WASMTIME}"
                           f", found {found}")


AsyncCallback = Callable[[int, Any, Any, int, Any, int, Any, Any], None]
"""(data, context_ptr, functype_ptr, args_ptr, num_args, results_ptr, num_results, error_out, continuation)."""

CONTINUATION_T = ffi.wasmtime_func_async_continuation_callback_t
ASYNC_FUNC_T = ffi.wasmtime_component_func_async_callback_t
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(0)


def add_async_func(linker_instance: Any, name: str, callback: Any) -> None:
    """Define `name` in a LinkerInstance as an async host function; callback is an ASYNC_FUNC_T."""
    encoded = name.encode()
    error = ffi.wasmtime_component_linker_instance_add_func_async(
        linker_instance.ptr(), ctypes.create_string_buffer(encoded), len(encoded), callback, None, _NO_FINALIZER)
    if error:
        raise WasmtimeError._from_ptr(error)


def add_wasip2_async(linker: Linker) -> None:
    error = ffi.wasmtime_component_linker_add_wasip2_async(linker.ptr())
    if error:
        raise WasmtimeError._from_ptr(error)


def epoch_yield_every(store: wasmtime.Store, ticks: int) -> None:
    """Make the guest yield to the poller each time `ticks` epochs pass while it runs."""
    ffi.wasmtime_context_epoch_deadline_async_yield_and_update(store._context(), ticks)


class CallFuture:
    """An in-flight async call (instantiate or `run`). poll() until it returns True, then read the outcome."""

    def __init__(self, ptr: Any, keep_alive: tuple[Any, ...]) -> None:
        self._ptr = ptr
        self._keep_alive = keep_alive  # argument/result/error buffers C writes into
        self.finished = False

    def poll(self) -> bool:
        if self._ptr is None:
            raise RuntimeError("poll on a deleted call future")
        if ffi.wasmtime_call_future_poll(self._ptr):
            self.finished = True
        return self.finished

    def delete(self) -> None:
        """Free the future; an unfinished call is cancelled."""
        if self._ptr is not None:
            ffi.wasmtime_call_future_delete(self._ptr)
            self._ptr = None


def instantiate_async(linker: Linker, store: wasmtime.Store, component: Component) -> tuple[CallFuture, Callable[[], Any]]:
    """Start instantiation; returns the future and a function giving the Instance (or raising) once done."""
    instance_out = ffi.wasmtime_component_instance_t()
    error_out = POINTER(ffi.wasmtime_error_t)()
    ptr = ffi.wasmtime_component_linker_instantiate_async(
        linker.ptr(), store._context(), component.ptr(), byref(instance_out), byref(error_out))
    future = CallFuture(ptr, (instance_out, error_out))

    def outcome() -> Any:
        if error_out:
            raise WasmtimeError._from_ptr(error_out)
        return wasmtime.component.Instance._from_raw(instance_out)
    return future, outcome


def call_run_async(func: Any, store: wasmtime.Store) -> tuple[CallFuture, Callable[[], Any]]:
    """Start calling a no-argument export with one result; outcome() gives the result's raw C val or raises."""
    result = ffi.wasmtime_component_val_t()
    error_out = POINTER(ffi.wasmtime_error_t)()
    ptr = ffi.wasmtime_component_func_call_async(
        byref(func._func), store._context(), None, 0, byref(result), 1, byref(error_out))
    future = CallFuture(ptr, (result, error_out, func))

    def outcome() -> Any:
        if error_out:
            raise WasmtimeError._from_ptr(error_out)
        return result
    return future, outcome

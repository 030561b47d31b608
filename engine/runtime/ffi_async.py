"""The slice of wasmtime's async C API the scheduler uses, reached through `wasmtime._ffi`.

This is private API of wasmtime-py, so the version is pinned exactly and checked here; tests cover every
function below. Facts (wasmtime 50 C API):
- an async host function's callback runs inside `wasmtime_call_future_poll`; it must set a continuation.
  wasmtime polls the continuation (a C callback returning true when done) on every later poll of the call
  future, and reads the results array only once the continuation returned true (until then the array
  stays valid and writable: the host may fill it any time before, see DoneFlag);
- `wasmtime_call_future_poll` returns true when the call finished (results/error written), false when the
  guest is suspended (in a pending host call, or at an epoch yield point);
- deleting an unfinished call future cancels the guest's execution (its fiber is dropped).
Object lifetimes are ours: every CFUNCTYPE object handed to C is kept alive in module/linker scope.
Speed: this path runs several times per host call, so callbacks take plain int pointers and the short
calls are PYFUNCTYPE objects bound to the C symbols (no wasmtime-py wrapper, no GIL hand-over).
"""
from __future__ import annotations

import ctypes
import struct
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


RAW_ASYNC_FUNC_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                    ctypes.c_void_p)
"""An async host function's callback with every pointer as a plain int (ctypes builds no pointer objects):
(data, context, functype, args, num_args, results, num_results, error_out, continuation)."""

ASYNC_FUNC_T = ffi.wasmtime_component_func_async_callback_t
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(0)
_CONTEXT_PTR = ctypes.POINTER(ffi.wasmtime_context_t)
_CONTINUATION = struct.Struct("<QQQ")  # wasmtime_async_continuation_t: callback, env, finalizer (NULL)
assert ctypes.sizeof(ffi.wasmtime_async_continuation_t) == _CONTINUATION.size

# Raw entry points. PYFUNCTYPE keeps the GIL over short calls (no hand-over to another thread mid-call);
# the poll runs the guest, so it releases the GIL like every ctypes CFUNCTYPE call.
_poll = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)(("wasmtime_call_future_poll", ffi.dll))
_set_epoch_deadline = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
    ("wasmtime_context_set_epoch_deadline", ffi.dll))
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)(
    ctypes._memmove_addr)  # type: ignore[attr-defined]


def add_async_func(linker_instance: Any, name: str, callback: Any) -> None:
    """Define `name` in a LinkerInstance as an async host function; callback is a RAW_ASYNC_FUNC_T."""
    encoded = name.encode()
    error = ffi.wasmtime_component_linker_instance_add_func_async(
        linker_instance.ptr(), ctypes.create_string_buffer(encoded), len(encoded),
        ctypes.cast(callback, ASYNC_FUNC_T), None, _NO_FINALIZER)
    if error:
        raise WasmtimeError._from_ptr(error)


_STRLEN = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value


class DoneFlag:
    """A continuation answered in C, with no Python callback on any poll: its callback is libc's strlen and
    its env a 2-byte string (flag, NUL), so wasmtime's `bool callback(void *env)` reads strlen(env), which
    is exactly 1 (done) or 0 (pending). (A size_t of 0/1 returned where a bool is read: the C ABIs keep a
    bool in the low byte of the return register; x86-64 SysV and AArch64 AAPCS both do.)
    The flag must outlive every poll of the call it continues: its owner keeps it until the call is
    finished or deleted."""

    def __init__(self, done: bool = False) -> None:
        self._buffer = ctypes.create_string_buffer(2)
        self.byte = memoryview(self._buffer).cast("B")  # byte[0]: 1 done, 0 pending (hot paths write it)
        self.byte[0] = done
        self.image = _CONTINUATION.pack(_STRLEN, ctypes.addressof(self._buffer), 0)  # for set_continuation

    @property
    def done(self) -> bool:
        return self.byte[0] != 0

    def set(self, done: bool) -> None:
        self.byte[0] = done


def set_continuation(continuation: int, image: bytes) -> None:
    """Fill the `wasmtime_async_continuation_t` at address `continuation` with a DoneFlag's image."""
    _memmove(continuation, image, _CONTINUATION.size)


def set_error(error_out: int, message: str) -> None:
    """Report a host error from an async callback (`*error_out = new wasmtime_error_t`)."""
    error = WasmtimeError(message)._consume()
    ctypes.c_void_p.from_address(error_out).value = ctypes.cast(error, ctypes.c_void_p).value


def context_pointer(context: int) -> Any:
    """The typed `wasmtime_context_t *` of a callback's int context (for wasmtime-py's own wrappers)."""
    return ctypes.cast(context, _CONTEXT_PTR)


def add_wasip2_async(linker: Linker) -> None:
    error = ffi.wasmtime_component_linker_add_wasip2_async(linker.ptr())
    if error:
        raise WasmtimeError._from_ptr(error)


def epoch_yield_every(store: wasmtime.Store, ticks: int) -> None:
    """Make the guest yield to the poller each time `ticks` epochs pass while it runs."""
    ffi.wasmtime_context_epoch_deadline_async_yield_and_update(store._context(), ticks)


class CallFuture:
    """An in-flight async call (instantiate or `run`). poll() until it returns True, then read the outcome."""

    def __init__(self, ptr: Any, store: wasmtime.Store, keep_alive: tuple[Any, ...]) -> None:
        self._address: int | None = ctypes.cast(ptr, ctypes.c_void_p).value
        self._context = ctypes.cast(store._context(), ctypes.c_void_p).value  # stable for the store's life
        self._keep_alive = keep_alive  # argument/result/error buffers C writes into, and the store
        self.finished = False

    def poll(self, epoch_deadline: int | None = None) -> bool:
        """Run the call until it finishes (True) or suspends (False); epoch_deadline: first set the store's
        deadline to that many epochs from now (a fresh time slice)."""
        address = self._address
        if address is None:
            raise RuntimeError("poll on a deleted call future")
        if epoch_deadline is not None:
            _set_epoch_deadline(self._context, epoch_deadline)
        if _poll(address):
            self.finished = True
            return True
        return False

    def delete(self) -> None:
        """Free the future; an unfinished call is cancelled."""
        if self._address is not None:
            ffi.wasmtime_call_future_delete(ctypes.cast(self._address, POINTER(ffi.wasmtime_call_future_t)))
            self._address = None


def instantiate_async(linker: Linker, store: wasmtime.Store, component: Component) -> tuple[CallFuture, Callable[[], Any]]:
    """Start instantiation; returns the future and a function giving the Instance (or raising) once done."""
    instance_out = ffi.wasmtime_component_instance_t()
    error_out = POINTER(ffi.wasmtime_error_t)()
    ptr = ffi.wasmtime_component_linker_instantiate_async(
        linker.ptr(), store._context(), component.ptr(), byref(instance_out), byref(error_out))
    future = CallFuture(ptr, store, (instance_out, error_out, store))

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
    future = CallFuture(ptr, store, (result, error_out, func, store))

    def outcome() -> Any:
        if error_out:
            raise WasmtimeError._from_ptr(error_out)
        return result
    return future, outcome

"""The `run` export: turns an author's `main(args)` into the component's entry point.

componentize-py looks for a class named `WitWorld` in the app module; `export(main)` makes one.
`pie build` writes that module for you; building by hand, end your module with
`WitWorld = pie_sdk.export(main)`.

Outcomes: main returning (or sys.exit(0), or --help) ends the instance normally; any exception ends it
with err("<Type>: <message>") followed by the traceback, which the host reports to the client.

prepare (optional; `pie build` passes the module's `prepare` function if it has one) runs first in an
instance started ahead of its launch (`pie serve --warm-instances`), before the arguments are read: work it
does (first calls of the paths a request takes, values it caches) is then done before the request arrives.
It is not called in an instance launched as usual. An exception in it is printed to stderr and ignored.
"""
from __future__ import annotations

import gc
import sys
import traceback
from typing import Callable

import wit_world
from componentize_py_types import Err
from wit_world.imports import runtime

from .errors import HostError, UsageError
from .runtime import HelpRequested, args

Main = Callable[[list[str]], object]
Prepare = Callable[[], object]


def export(main: Main, prepare: Prepare | None = None) -> type:
    """The WitWorld class for main. Called as the app module's import ends, while componentize-py snapshots the
    start-up heap: it freezes that heap (gc.freeze), so no collection of a running instance walks it. Every
    instance starts from a copy-on-write image of the snapshot; a collection that walked it would write into
    (and so copy) every page that holds a tracked object. Outside the sandbox (the SDK's tests under CPython)
    nothing is snapshotted, and the caller's heap is left as it is."""
    if not callable(main):
        raise TypeError(f"the inferlet's main must be callable, got {type(main).__name__}")
    if prepare is not None and not callable(prepare):
        raise TypeError(f"the inferlet's prepare must be callable, got {type(prepare).__name__}")
    if sys.platform == "wasi":
        gc.collect()
        gc.freeze()

    class WitWorld(wit_world.WitWorld):
        def run(self) -> None:
            if prepare is not None and runtime.started_ahead():
                run_prepare(prepare)
            error = run_main(main)
            if error is not None:
                raise Err(error)

    return WitWorld


def run_prepare(prepare: Prepare) -> None:
    try:
        prepare()
    except Exception:  # an optimisation only: the request is served as in a cold instance
        print("prepare() failed (ignored):", file=sys.stderr)
        traceback.print_exc()


def run_main(main: Main) -> str | None:
    """Runs main with the launch arguments; returns None on success or the error message."""
    try:
        main(args())
    except HelpRequested:
        return None
    except SystemExit as exit_:
        return None if exit_.code in (None, 0) else f"exit status {exit_.code}"
    except UsageError as error:  # the usage text says it all; no traceback
        return str(error)
    except BaseException as error:  # the instance must end with err(...), never trap
        return _describe(error)
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, Err):  # a raw binding's error that nobody caught
        error = HostError(str(error.value)).with_traceback(error.__traceback__)
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    return f"{type(error).__name__}: {error}\n" + "".join(frames).rstrip()

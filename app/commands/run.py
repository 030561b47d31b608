"""`pie run INFERLET -- ARGS...`: run one inferlet locally against the engine and print what it sends.

INFERLET is a built component (.wasm) or a Python inferlet (a .py file or a folder with main.py), which is
built first (cached). The engine (engine/engine.py) starts in this process on the default model (or --model). Text the
inferlet sends goes to stdout as it comes (channel 0 as is, other channels prefixed), JSON events as
`[event] ...` lines; progress and the inferlet's own stdout/stderr (print) go to stderr. The exit status is
0 when the inferlet ended normally and 1 with its error otherwise (2 for bad arguments of pie run itself).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from typing import TYPE_CHECKING, Any

from pie_server.app.inferlet_build import BuildError, build_inferlet, default_cache_dir
from pie_server.engine.runtime.messages import Event, Message, Terminated, Text

if TYPE_CHECKING:  # torch and the engine load only when pie run starts one
    from pie_server.engine.engine import Engine

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUMMARY = "run an inferlet locally on the engine and print what it sends"
DESCRIPTION = """\
Starts the engine in this process on the default model (or --model), runs one inferlet (a .wasm component, or
Python source built first) with the arguments after `--`, and prints the text it sends to stdout as it comes;
JSON events as `[event] ...` lines. Progress and the inferlet's own prints go to stderr. Exit status 0 when
the inferlet ended normally, 1 when it failed, 2 for bad arguments."""
EXAMPLES = """\
  pie run tc.wasm -- --prompt "The capital of France is" --max-tokens 16
  pie run inferlets/contrib/text-completion -- --prompt "Once upon a time"   # built first (cached)
  pie run chat.py --model ~/models/Qwen2.5-0.5B-Instruct --send "Hi!" --timeout 60"""


class _IntermixedParser(argparse.ArgumentParser):
    """Parses options after the positionals too (`pie run x.wasm --model M -- ARGS`): plain argparse binds
    INFERLET and ARGS at once and then rejects everything after the option."""

    _parsing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._parsing:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = _IntermixedParser  # the subparser app/cli.py made for us
    parser.add_argument("inferlet", type=Path, help="a component (.wasm) or a Python inferlet (file or folder)")
    parser.add_argument("args", nargs="*", metavar="ARG", help="the inferlet's arguments, after `--`")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="weights and KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--page-size", type=int, default=16, metavar="N", help="KV slots per page (default: 16)")
    parser.add_argument("--num-pages", type=int, default=None, metavar="N",
                        help="KV pages (default: sized from memory)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long the inferlet may run (default: 600)")
    parser.add_argument("--send", action="append", default=[], metavar="MESSAGE",
                        help="a message for the inferlet to receive() (repeatable, in order)")


def main(args: argparse.Namespace) -> int:
    from pie_server.engine.config import EngineConfig
    from pie_server.engine.engine import Engine
    from pie_server.engine.runtime.config import RuntimeConfig

    try:
        device = args.device or _default_device()
        engine_config = EngineConfig(device=device, dtype=args.dtype, page_size=args.page_size,
                                     num_pages=args.num_pages)
        runtime_config = RuntimeConfig(time_budget_s=args.timeout,
                                       cache_dir=str(default_cache_dir().parent / "compiled"))
        wasm = _component_bytes(args.inferlet)
    except (BuildError, ValueError, OSError) as error:
        print(f"pie run: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    _progress("starting the engine on " + (args.model or "the default model"))
    try:
        engine = Engine.start(args.model, engine_config, runtime_config=runtime_config)  # bars: engine/progress.py
    except (ValueError, OSError) as error:
        print(f"pie run: error: cannot start the engine: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        try:
            program_hash = engine.runtime.load(wasm)
        except ValueError as error:
            print(f"pie run: error: {args.inferlet} is not a valid inferlet component: {error}", file=sys.stderr)
            return EXIT_USAGE
        return run_instance(engine, program_hash, list(args.args), list(args.send), args.timeout + 30.0)
    finally:
        engine.close()


def run_instance(engine: "Engine", program_hash: str, arguments: list[str], inputs: list[str],
                 timeout_s: float, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Launch, print messages as they come, return the exit status."""
    handle = engine.runtime.launch(program_hash, arguments)
    for message in inputs:
        handle.send(message)
    deadline = time.monotonic() + timeout_s
    printer = MessagePrinter(out)
    try:
        while True:
            message = handle.get_message(max(0.0, deadline - time.monotonic()))
            if isinstance(message, Terminated):
                break
            printer.print(message)
    except (TimeoutError, KeyboardInterrupt) as stop:
        handle.kill("stopped by pie run")
        printer.end_line()
        print(f"pie run: {'timed out' if isinstance(stop, TimeoutError) else 'interrupted'}", file=err)
        return EXIT_FAILED
    printer.end_line()
    _print_guest_output(handle, err)
    if not message.ok:
        print(f"pie run: the inferlet failed: {message.error}", file=err)
        return EXIT_FAILED
    return EXIT_OK


def _component_bytes(source: Path) -> bytes:
    if source.is_file() and source.suffix == ".wasm":
        return source.read_bytes()
    if not source.exists():
        raise BuildError(f"{source}: no such file or folder")
    _progress(f"building {source}")
    built = build_inferlet(source, default_cache_dir() / "run" / "inferlet.wasm")
    return built.read_bytes()


class MessagePrinter:
    """Writes messages to out: channel-0 text as is, other channels and events on lines of their own."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.at_line_start = True

    def print(self, message: Message) -> None:
        if isinstance(message, Text) and message.channel == 0:
            self._write(message.text)
        elif isinstance(message, Text):
            self._write_line(f"[channel {message.channel}] {message.text}")
        elif isinstance(message, Event):
            self._write_line(f"[event] {message.json}")

    def end_line(self) -> None:
        if not self.at_line_start:
            self._write("\n")

    def _write_line(self, text: str) -> None:
        self.end_line()
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.at_line_start = text.endswith("\n")


def _print_guest_output(handle: Any, err: TextIO) -> None:
    """The inferlet's own stdout and stderr (print, tracebacks), which the runtime captures."""
    text = handle.log_text()
    if text.strip():
        print(f"--- inferlet output ---\n{text.rstrip()}\n---", file=err)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress(text: str) -> None:
    print(f"pie run: {text}", file=sys.stderr, flush=True)


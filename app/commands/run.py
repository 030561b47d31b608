"""`pie run INFERLET -- ARGS...`: run one inferlet locally against the engine and print what it sends.

INFERLET is a built component (.wasm) or a Python inferlet (a .py file or a folder with main.py), which is
built first (cached). The engine starts in this process on the default model (or --model). Text the
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

from dataclasses import dataclass
from typing import Any

from app.inferlet_build import BuildError, build_inferlet, default_cache_dir
from engine.runtime.messages import Event, Message, Terminated, Text

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--page-size", type=int, default=16, help="KV slots per page")
    parser.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from memory)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the inferlet may run")
    parser.add_argument("--send", action="append", default=[], metavar="MESSAGE",
                        help="a message for the inferlet to receive() (repeatable, in order)")


def main(args: argparse.Namespace) -> int:
    try:
        config = LocalEngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                   page_size=args.page_size, num_pages=args.num_pages, time_budget_s=args.timeout)
        wasm = _component_bytes(args.inferlet)
    except (BuildError, ValueError, OSError) as error:
        print(f"pie run: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    _progress("starting the engine" + (f" on {args.model}" if args.model else " on the default model"))
    try:
        engine = LocalEngine.start(config)
    except (ValueError, OSError) as error:
        print(f"pie run: error: cannot start the engine: {error}", file=sys.stderr)
        return EXIT_FAILED
    with engine:
        try:
            program_hash = engine.runtime.load(wasm)
        except ValueError as error:
            print(f"pie run: error: {args.inferlet} is not a valid inferlet component: {error}", file=sys.stderr)
            return EXIT_USAGE
        return run_instance(engine, program_hash, list(args.args), list(args.send), args.timeout + 30.0)


def run_instance(engine: LocalEngine, program_hash: str, arguments: list[str], inputs: list[str],
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
    _print_guest_output(handle.log_path, err)
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


def _print_guest_output(log_path: str | None, err: TextIO) -> None:
    """The inferlet's own stdout and stderr (print, tracebacks), which the runtime writes to files."""
    if log_path is None:
        return
    for path, label in ((Path(log_path), "stdout"), (Path(log_path + ".stderr"), "stderr")):
        text = path.read_text(errors="replace") if path.is_file() else ""
        if text.strip():
            print(f"--- inferlet {label} ---\n{text.rstrip()}", file=err)


def _progress(text: str) -> None:
    print(f"pie run: {text}", file=sys.stderr, flush=True)


# -- the engine in this process ----------------------------------------------------------------------------
# Until the composition root (engine/engine.py) lands, pie run assembles model, executor, control layer and
# runtime itself. Imports are local: `pie build` and `pie --help` must not pay for torch.

@dataclass(frozen=True)
class LocalEngineConfig:
    model: str | None = None  # None: the embedded default model
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None
    page_size: int = 16
    num_pages: int | None = None
    time_budget_s: float = 600.0

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ValueError(f"--page-size must be a positive power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError(f"--num-pages must be positive, got {self.num_pages}")
        if self.time_budget_s <= 0:
            raise ValueError(f"--timeout must be positive, got {self.time_budget_s}")


class LocalEngine:
    """Executor + control layer (stepping on its own thread) + inferlet runtime over one model."""

    def __init__(self, executor: Any, control: Any, tokenizer: Any, runtime: Any) -> None:
        self.executor, self.control, self.tokenizer, self.runtime = executor, control, tokenizer, runtime

    @classmethod
    def start(cls, config: LocalEngineConfig, model_dir: Path | None = None) -> "LocalEngine":
        import torch

        from engine.config import EngineConfig
        from engine.control.config import ControlConfig
        from engine.control.controller import Controller
        from engine.executor.executor import Executor
        from engine.model.loader import load_model_config, load_weights, resolve_model_dir
        from engine.runtime.config import ModelInfo, RuntimeConfig
        from engine.runtime.runtime import Runtime
        from engine.runtime.tokenizer import EngineTokenizerAdapter
        from engine.tokenizer import Tokenizer

        model_dir = model_dir or resolve_model_dir(config.model)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine_config = EngineConfig(device=device, dtype=config.dtype, page_size=config.page_size,
                                     num_pages=config.num_pages)
        model_config = load_model_config(model_dir)
        weights = load_weights(model_dir, getattr(torch, engine_config.resolved_dtype), device, progress=False)
        executor = Executor(model_config, engine_config, weights)
        control = Controller(executor, ControlConfig.for_engine(engine_config, model_config))
        tokenizer = Tokenizer.from_dir(model_dir)
        info = ModelInfo(name=model_dir.name, vocab_size=model_config.vocab_size, page_size=executor.info.page_size,
                         max_context_len=executor.info.max_context_len, chat_template=tokenizer.chat_template or "",
                         bos_token_id=tokenizer.bos_token_id, eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)))
        runtime_config = RuntimeConfig(time_budget_s=config.time_budget_s,
                                       cache_dir=str(default_cache_dir().parent / "compiled"))
        control.start()
        try:
            runtime = Runtime(control, EngineTokenizerAdapter(tokenizer), info, runtime_config)
        except BaseException:
            control.stop()
            raise
        return cls(executor, control, tokenizer, runtime)

    def close(self) -> None:
        self.runtime.close()
        self.control.stop()

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The executor in a process of its own (opt-in, `PIE_EXECUTOR_PROCESS=1`): the engine core's control loop sends
each step's Batch down a pipe and reads its StepResult back; a worker process owns the model and the device.

Why (docs/decisions/executor-process.md, 2026-12-08): with decodes speculated two steps ahead
(ControlConfig.speculation_depth 2) what bounds a small model's decode loop is the engine core's host time per
step, and about half of it is the executor's submit (step inputs, the attention plan, staging, the replay's
launch). Here that half runs beside the control layer instead of after it. One step ahead it would not pay: the
chain deliver N -> form N + 2 -> submit N + 2 would only get longer by the pipe.

The wire: msgspec msgpack. A Batch goes as it is (64 decode rows: ~26 us to encode on the 2-core CPU); the worker
decodes it into look-alike structs (`_Command`, with `fed_token` as a `_TokenRef`) that the executor reads as it
reads ForwardCommands, each distinct output spec decoded once (`_OutputSpecs`). A StepResult comes back as it is.
Every submitted step gets exactly one answer, in order: its result, or the error its submit or its result
raised (`_Answer`). The core's `RemotePending.result()` reads the next one; the step loop asks in order.

Worker threads: the main one receives and submits (enqueues the device work), a second one waits for each step's
tokens in order and sends its result; so the worker never holds a step back while the next one waits to launch.
A failed submit clears the executor's last-step outputs (nothing after it may take a token from it).

If the worker dies, the core cannot run a step again: `on_lost` is called (the engine core exits, and its
supervisor starts a new one, as after any crash of the core).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import msgspec

from pie_server.engine.config import EngineConfig, EngineInfo, ModelConfig
from pie_server.engine.step import Batch, OutputSpec, PageCopy, PageSwap, StepResult

log = logging.getLogger(__name__)

ENV_VAR = "PIE_EXECUTOR_PROCESS"
START_TIMEOUT_S = 1800.0  # loading a large model and capturing its graphs


class _TokenRef(msgspec.Struct):
    command_index: int
    output_index: int = 0


class _Command(msgspec.Struct):
    """A ForwardCommand as the worker reads it: the same fields; `outputs` decoded by _OutputSpecs."""

    token_ids: list[int]
    positions: list[int]
    page_ids: list[int]
    last_page_len: int
    outputs: msgspec.Raw = msgspec.Raw(b"\x90")  # on the wire ([] by default); then a tuple of OutputSpec
    attention_mask: list[list[bool]] | None = None
    fed_token: _TokenRef | None = None

    def context_len(self, page_size: int) -> int:
        return (len(self.page_ids) - 1) * page_size + self.last_page_len


class _Batch(msgspec.Struct):
    forwards: list[_Command] = []
    page_copies: list[PageCopy] = []
    swap_outs: list[PageSwap] = []
    swap_ins: list[PageSwap] = []
    step_id: int = 0


class _Answer(msgspec.Struct, array_like=True):
    """One per submitted step, in order: its result, or (error_type, message)."""

    step_id: int
    result: StepResult | None = None
    error: tuple[str, str] | None = None


class _Ready(msgspec.Struct, array_like=True):
    info: EngineInfo | None = None
    num_swap_slots: int = 0
    error: str | None = None


class _OutputSpecs:
    """Output specs by their encoding: a decode's rows carry the same spec every step, so each distinct one is
    decoded (and its SamplingParams checked) once. Bounded: penalties put the tokens so far into every spec."""

    MAX_KEPT = 4096

    def __init__(self) -> None:
        self._decoder = msgspec.msgpack.Decoder(tuple[OutputSpec, ...])
        self._kept: dict[bytes, tuple[OutputSpec, ...]] = {}

    def decode(self, raw: msgspec.Raw) -> tuple[OutputSpec, ...]:
        key = bytes(raw)
        specs = self._kept.get(key)
        if specs is None:
            if len(self._kept) >= self.MAX_KEPT:
                self._kept.clear()
            specs = self._kept[key] = self._decoder.decode(key)
        return specs


@dataclass(frozen=True)
class EmulatedSpec:
    """An emulated device in the worker (engine/executor/emulated.py), for the host's part on any machine."""

    step_s: float
    eos_token_ids: tuple[int, ...]
    submit_s: float = 0.0

    def executor(self, model_config: ModelConfig, config: EngineConfig) -> Any:
        from pie_server.engine.executor.emulated import EmulatedExecutor
        return EmulatedExecutor(model_config, config, self.step_s, list(self.eos_token_ids), submit_s=self.submit_s)


@dataclass(frozen=True)
class WorkerSpec:
    model_dir: Path | None  # None: random weights
    model_config: ModelConfig
    config: EngineConfig
    emulated: EmulatedSpec | None = None  # instead of the model
    log_level: str = "INFO"

    def start(self) -> Any:
        """The worker's executor."""
        if self.emulated is not None:
            return self.emulated.executor(self.model_config, self.config)
        from pie_server.engine.executor.tensor_parallel import start_executor
        return start_executor(self.model_dir, self.model_config, self.config, progress=False)


# ------------------------------------------------------------------------------------------------ the core's side


class RemotePending:
    def __init__(self, executor: "RemoteExecutor", step_id: int) -> None:
        self.step_id, self._executor = step_id, executor

    def result(self) -> StepResult:
        return self._executor._next_result(self.step_id)


class RemoteExecutor:
    """The Executor interface the control layer drives (info, num_swap_slots, submit, execute, close) over a
    worker process."""

    def __init__(self, spec: WorkerSpec, on_lost: Callable[[BaseException], None] | None = None) -> None:
        if spec.config.tensor_parallel_size > 1:  # the worker is a daemon process, which may not start the ranks
            raise ValueError(f"{ENV_VAR}=1 does not work with tensor parallelism yet")
        context = multiprocessing.get_context("spawn")
        self._steps_out, steps_in = context.Pipe(duplex=False)  # (reader, writer): the worker reads steps
        answers_in, self._answers_out = context.Pipe(duplex=False)
        self._steps_in, self._answers_in = steps_in, answers_in
        self._process = context.Process(target=_serve, args=(spec, self._steps_out, self._answers_out),
                                        name="pie-executor", daemon=True)
        self._process.start()
        self._steps_out.close()  # the worker's ends
        self._answers_out.close()
        self._on_lost = on_lost or _exit_core
        self.model_config = spec.model_config  # the control layer's token and position bounds
        self._encoder = msgspec.msgpack.Encoder()
        self._answer_decoder = msgspec.msgpack.Decoder(_Answer)
        ready = self._wait_ready()
        assert ready.info is not None
        self.info: EngineInfo = ready.info
        self.num_swap_slots = ready.num_swap_slots

    def _wait_ready(self) -> _Ready:
        if not self._answers_in.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the executor process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            ready = msgspec.msgpack.decode(self._answers_in.recv_bytes(), type=_Ready)
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the executor process exited while starting (code {self._process.exitcode})") \
                from None
        if ready.error is not None:
            self.close()
            raise RuntimeError(f"the executor process failed to start: {ready.error}")
        return ready

    def submit(self, batch: Batch) -> RemotePending:
        try:
            self._steps_in.send_bytes(self._encoder.encode(batch))
        except OSError as exc:
            self._lost(exc)
            raise RuntimeError("the executor process has exited") from exc
        return RemotePending(self, batch.step_id)

    def execute(self, batch: Batch) -> StepResult:
        return self.submit(batch).result()

    def _next_result(self, step_id: int) -> StepResult:
        """The next answer, which must be step_id's: the step loop reads every step's once, in order."""
        try:
            answer = self._answer_decoder.decode(self._answers_in.recv_bytes())
        except (EOFError, OSError) as exc:
            self._lost(exc)
            raise RuntimeError("the executor process has exited") from exc
        if answer.step_id != step_id:
            raise RuntimeError(f"the executor process answered step {answer.step_id} where step {step_id} was due")
        if answer.error is not None:
            kind, message = answer.error
            raise (ValueError if kind == "ValueError" else RuntimeError)(message)
        assert answer.result is not None
        return answer.result

    def _lost(self, error: BaseException) -> None:
        self._process.join(1)
        log.error("the executor process ended (exit code %s)", self._process.exitcode)
        self._on_lost(error)

    def close(self) -> None:
        """Ends the worker (it stops at the end of its step pipe)."""
        self._steps_in.close()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._answers_in.close()


def _exit_core(error: BaseException) -> None:
    """Without its executor the engine core can run no step: it ends, and its supervisor starts a new one."""
    log.critical("the executor process is gone (%r): the engine core exits", error)
    logging.shutdown()
    os._exit(70)


def remote_executor_wanted() -> bool:
    """PIE_EXECUTOR_PROCESS=1: run the executor in a process of its own (A/B runs); unset or 0: in-process."""
    raw = os.environ.get(ENV_VAR, "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR}={raw!r}: must be 0 or 1")
    return raw == "1"


# --------------------------------------------------------------------------------------------- the worker's side


def _serve(spec: WorkerSpec, steps: Connection, answers: Connection) -> None:
    """The worker's main: build the executor, then submit steps as they come until the core closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the core ends this one
    logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s [executor]: %(message)s")
    try:
        executor = spec.start()
    except BaseException as exc:  # the core shows it
        answers.send_bytes(msgspec.msgpack.encode(_Ready(error=f"{type(exc).__name__}: {exc}")))
        raise SystemExit(1) from None
    answers.send_bytes(msgspec.msgpack.encode(_Ready(executor.info, executor.num_swap_slots)))
    submitted: queue.Queue[Any] = queue.Queue()
    sender = threading.Thread(target=_send_answers, args=(submitted, answers), name="answers", daemon=True)
    sender.start()
    decoder, specs = msgspec.msgpack.Decoder(_Batch), _OutputSpecs()
    while True:
        try:
            raw = steps.recv_bytes()
        except (EOFError, OSError):
            break  # the core is gone, or closed the pipe
        step_id = -1  # (a step that cannot be decoded: the core's encoder never sends one)
        try:
            batch = _decoded(decoder, specs, raw)
            step_id = batch.step_id
            submitted.put((step_id, executor.submit(batch)))  # type: ignore[arg-type]
        except Exception as exc:  # this step's answer; no later step may take a token from it
            executor.forget_previous()
            submitted.put((step_id, exc))
    submitted.put(None)
    sender.join()
    executor.close()


def _decoded(decoder: msgspec.msgpack.Decoder, specs: _OutputSpecs, raw: bytes) -> _Batch:
    batch = decoder.decode(raw)
    for command in batch.forwards:
        command.outputs = specs.decode(command.outputs)
    return batch


def _send_answers(submitted: "queue.Queue[Any]", answers: Connection) -> None:
    """In submission order: each step's result once its tokens are on the host, or its error."""
    encoder = msgspec.msgpack.Encoder()
    while (item := submitted.get()) is not None:
        step_id, pending = item
        if isinstance(pending, Exception):
            answer = _Answer(step_id, error=(type(pending).__name__, str(pending)))
        else:
            try:
                answer = _Answer(step_id, result=pending.result())
            except Exception as exc:
                answer = _Answer(step_id, error=(type(exc).__name__, str(exc)))
        try:
            answers.send_bytes(encoder.encode(answer))
        except OSError:
            return  # the core is gone


"""Tensor parallelism behind one executor facade: rank 0 is the Executor the control layer drives (nothing
above it changes); ranks 1..P-1 are worker processes, each an Executor over its shard of the model
(engine/model/parallel.py), that repeat every step rank 0 runs.

Per step, rank 0 -> the other ranks, after the step is validated (a refused batch never reaches them):
- the step's host part (StepMessage: swaps, page copies and the forward's index arrays; msgspec msgpack) over
  one pipe per worker. A pipe, not a collective: a worker waits in recv() as long as the server is idle,
  with no collective timeout to run into, and the pipe's end (EOF) tells it that rank 0 is gone;
- on torch.distributed's default group (NCCL on CUDA, gloo on CPU): the tokens a pipelined step takes from
  the previous one (still on rank 0's device: a broadcast), then the forward's own collectives (two
  all-reduces per layer, the logits gathered on rank 0). Every rank issues them in the same order.

Start-up: rank 0 spawns the workers; every rank reads its shard of the weights (the workers say "loaded" on
their pipe, or send their error), then all join the process group (a FileStore rendezvous in a private
folder) and build their Executor together: the memory probes, the pool size (the smallest any rank can hold)
and the CUDA-graph captures run on every rank in the same order. Then the workers say "ready" and wait for
steps. NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 in every rank's environment.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from pie_server.engine.config import EngineConfig, ModelConfig
from pie_server.engine.executor.executor import Executor
from pie_server.engine.executor.step_inputs import StepInputs
from pie_server.engine.model.loader import load_weights
from pie_server.engine.model.parallel import Shard, TensorParallel, check_divisible
from pie_server.engine.step import Batch, PageCopy, PageSwap
from pie_server.kernels.attention import AttentionStep
from pie_server.kernels.transfer import to_device

log = logging.getLogger(__name__)

# How long a collective may wait for a rank before it fails (the default group's timeout).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
_LOADED, _READY, _ERROR = b"loaded", b"ready", b"error:"  # worker -> rank 0 at start-up
_STOP = b""  # rank 0 -> worker: return


# -------------------------------------------------------------------------------------------- the step message

# The forward's int64 arrays, packed one after another in ForwardArrays.data.
_ARRAYS = ("token_ids", "positions", "qo_indptr", "kv_page_indptr", "kv_page_ids", "kv_last_page_lens",
           "slot_ids", "output_rows", "fed_rows")


class ForwardArrays(msgspec.Struct, array_like=True):
    """What a worker needs of a step's StepInputs: everything but the sampling (only rank 0 samples)."""

    page_size: int
    lengths: list[int]  # of each of _ARRAYS
    data: bytes  # int64, native byte order (every rank runs on this host)
    custom_masks: list[list[list[bool]] | None] | None = None

    @classmethod
    def of(cls, inputs: StepInputs) -> "ForwardArrays":
        step = inputs.attention
        arrays = [np.asarray(a, np.int64) for a in (
            inputs.token_ids, inputs.positions, step.qo_indptr, step.kv_page_indptr, step.kv_page_ids,
            step.kv_last_page_lens, step.slot_ids, inputs.output_rows, inputs.fed_rows)]
        masks = None if step.custom_masks is None else \
            [None if m is None else [list(map(bool, row)) for row in m] for m in step.custom_masks]
        return cls(step.page_size, [len(a) for a in arrays], np.concatenate(arrays).tobytes(), masks)

    def inputs(self) -> StepInputs:
        flat = np.frombuffer(self.data, np.int64).copy()  # writable: the CPU path shares it with torch
        parts = dict(zip(_ARRAYS, np.split(flat, np.cumsum(self.lengths)[:-1])))
        step = AttentionStep(page_size=self.page_size, qo_indptr=parts["qo_indptr"],
                             kv_page_indptr=parts["kv_page_indptr"], kv_page_ids=parts["kv_page_ids"],
                             kv_last_page_lens=parts["kv_last_page_lens"], slot_ids=parts["slot_ids"],
                             custom_masks=self.custom_masks)
        return StepInputs(parts["token_ids"], parts["positions"], step, parts["output_rows"], [], [],
                          parts["fed_rows"], [])


class StepMessage(msgspec.Struct, array_like=True):
    swap_outs: list[PageSwap]
    swap_ins: list[PageSwap]
    page_copies: list[PageCopy]
    forward: ForwardArrays | None

    @classmethod
    def of(cls, batch: Batch, inputs: StepInputs | None) -> "StepMessage":
        return cls(list(batch.swap_outs), list(batch.swap_ins), list(batch.page_copies),
                   None if inputs is None else ForwardArrays.of(inputs))


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(StepMessage)


def follow_step(executor: Executor, message: StepMessage) -> None:
    """A worker's part of one step, in rank 0's order: swaps, page copies, the fed tokens, the forward."""
    assert executor.parallel is not None
    executor.kv.swap_out(message.swap_outs)
    executor.kv.swap_in(message.swap_ins)
    executor.kv.copy(message.page_copies)
    if message.forward is None:
        return
    inputs = message.forward.inputs()
    fed = None
    if len(inputs.fed_rows):
        tokens = executor.parallel.broadcast(torch.empty(len(inputs.fed_rows), dtype=torch.int64,
                                                         device=executor.device))
        fed = (to_device(inputs.fed_rows, executor.device), tokens)
    executor.forward_logits(inputs, fed)


# ---------------------------------------------------------------------------------------------- rank 0's side


class WorkerError(RuntimeError):
    """A worker failed to start (its own error, or its exit)."""


class WorkerRanks:
    """Rank 0's handle on ranks 1..P-1: their processes and pipes."""

    def __init__(self) -> None:
        self.processes: list[BaseProcess] = []
        self.connections: list[Connection] = []

    def send_step(self, batch: Batch, inputs: StepInputs | None) -> None:
        data = _ENCODER.encode(StepMessage.of(batch, inputs))
        for rank, conn in enumerate(self.connections, start=1):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                raise RuntimeError(f"tensor-parallel rank {rank} has exited") from exc

    def wait_for(self, expected: bytes, what: str) -> None:
        """Until every worker has sent `expected`; WorkerError with a worker's error, or when one exits."""
        for rank, (conn, process) in enumerate(zip(self.connections, self.processes), start=1):
            while not conn.poll(0.2):
                if not process.is_alive():
                    raise WorkerError(f"tensor-parallel rank {rank} exited (code {process.exitcode}) {what}")
            reply = _receive(conn)
            if reply != expected:
                raise WorkerError(f"tensor-parallel rank {rank} failed {what}: {_error_text(reply)}")

    def first_error(self) -> str | None:
        """A worker's start-up error, if one has sent it (for rank 0's own failure in a collective)."""
        for rank, conn in enumerate(self.connections, start=1):
            if conn.poll(1.0):
                reply = _receive(conn)
                if reply.startswith(_ERROR) or reply == b"EOF":
                    return f"tensor-parallel rank {rank}: {_error_text(reply)}"
        return None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the workers, and rank 0 leaves the process group on CPU (NCCL's: see _follow)."""
        for conn in self.connections:
            try:
                conn.send_bytes(_STOP)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()
                process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)
        for conn in self.connections:
            conn.close()
        self.processes, self.connections = [], []
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()


def _receive(conn: Connection) -> bytes:
    try:
        return conn.recv_bytes()
    except (EOFError, OSError):
        return b"EOF"


def _error_text(reply: bytes) -> str:
    if reply == b"EOF":
        return "it exited without a word"
    return reply[len(_ERROR):].decode(errors="replace") if reply.startswith(_ERROR) else repr(reply)


def start_executor(model_dir: Path | None, model_config: ModelConfig, config: EngineConfig,
                   progress: bool = True) -> Executor:
    """The engine's executor: a plain Executor, or with tensor_parallel_size P > 1 rank 0 of P (its
    worker_ranks started and ready). model_dir None: random weights (benchmarks)."""
    dtype = getattr(torch, config.resolved_dtype)
    if config.tensor_parallel_size == 1:
        weights = None if model_dir is None else load_weights(model_dir, dtype, progress=progress)
        return Executor(model_config, config, weights)
    size = config.tensor_parallel_size
    check_divisible(model_config, size)
    if dist.is_initialized():  # the ranks' collectives run on torch.distributed's default group
        raise RuntimeError("this process already holds a tensor-parallel group: close() its executor first")
    devices = rank_devices(config.device, size)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, for rank 0 and (inherited) every worker
    rendezvous = tempfile.mkdtemp(prefix="pie-tp-")
    workers = WorkerRanks()
    try:
        _spawn_workers(workers, model_dir, model_config, config, devices, f"file://{rendezvous}/store")
        if devices[0].startswith("cuda"):
            torch.cuda.set_device(devices[0])
        shard = Shard(0, size)
        weights = None if model_dir is None else load_weights(model_dir, dtype, progress=progress, shard=shard)
        workers.wait_for(_LOADED, "loading its shard")
        parallel = _join_group(shard, devices[0], f"file://{rendezvous}/store")
        executor = Executor(model_config, dataclasses.replace(config, device=devices[0]), weights,
                            parallel=parallel)
        workers.wait_for(_READY, "building its executor")
    except BaseException as exc:
        error = None if isinstance(exc, WorkerError) else workers.first_error()
        workers.close(timeout_s=1.0)
        if error is not None and isinstance(exc, RuntimeError):  # a collective that failed: the worker's cause
            raise WorkerError(error) from exc
        if error is not None:
            exc.add_note(error)
        raise
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    executor.worker_ranks = workers
    log.info("tensor parallel: %d ranks on %s", size, ", ".join(devices))
    return executor


def rank_devices(device: str, size: int) -> list[str]:
    """Each rank's device: cpu for all, or cuda:N+r from cuda[:N]."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["cpu"] * size
    base = int(index or 0)
    available = torch.cuda.device_count()
    if base + size > available:
        raise ValueError(f"--tensor-parallel-size {size} from {device} needs cuda:{base}..{base + size - 1}; "
                         f"this machine has {available} GPU(s)")
    return [f"cuda:{base + rank}" for rank in range(size)]


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    model_dir: str | None  # None: random weights
    model_config: ModelConfig
    engine_config: EngineConfig  # its device is the rank's
    init_method: str
    num_threads: int
    log_level: int


def _spawn_workers(workers: WorkerRanks, model_dir: Path | None, model_config: ModelConfig,
                   config: EngineConfig, devices: list[str], init_method: str) -> None:
    """Spawned, not forked (CUDA and threads do not survive a fork); daemons, so they end with rank 0."""
    context = multiprocessing.get_context("spawn")
    num_threads = max(1, torch.get_num_threads() // len(devices))  # CPU ranks share this machine's cores
    for rank in range(1, len(devices)):
        spec = WorkerSpec(rank, None if model_dir is None else str(model_dir), model_config,
                          dataclasses.replace(config, device=devices[rank]), init_method, num_threads,
                          logging.getLogger().getEffectiveLevel())
        ours, theirs = context.Pipe()
        process = context.Process(target=run_worker, args=(spec, theirs), name=f"pie-tp-rank-{rank}", daemon=True)
        process.start()
        theirs.close()
        workers.processes.append(process)
        workers.connections.append(ours)


def _join_group(shard: Shard, device: str, init_method: str) -> TensorParallel:
    if device.startswith("cuda"):
        dist.init_process_group("nccl", init_method=init_method, rank=shard.rank, world_size=shard.world_size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=shard.rank, world_size=shard.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    return TensorParallel(shard)


# ------------------------------------------------------------------------------------------- a worker's side


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process's main: load, join, build, then follow rank 0's steps until told to stop."""
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {spec.rank}]: %(message)s")
    torch.set_num_threads(spec.num_threads)
    shard = Shard(spec.rank, spec.engine_config.tensor_parallel_size)
    device = spec.engine_config.device
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        weights = None if spec.model_dir is None else \
            load_weights(spec.model_dir, getattr(torch, spec.engine_config.resolved_dtype), progress=False,
                         shard=shard)
        conn.send_bytes(_LOADED)
        parallel = _join_group(shard, device, spec.init_method)
        executor = Executor(spec.model_config, spec.engine_config, weights, parallel=parallel)
        conn.send_bytes(_READY)
    except BaseException as exc:
        log.exception("tensor-parallel rank %d failed to start", spec.rank)
        try:
            conn.send_bytes(_ERROR + f"{type(exc).__name__}: {exc}".encode())
        except OSError:
            pass
        raise SystemExit(1) from None
    _follow(executor, conn)


def _follow(executor: Executor, conn: Connection) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # rank 0 is gone
            break
        if data == _STOP:
            break
        follow_step(executor, _DECODER.decode(data))
    if executor.device.type != "cuda":
        dist.destroy_process_group()
        return
    # NCCL: destroying the communicators after CUDA-graph capture of their collectives can hang
    # (pytorch/pytorch#115388), and so did this process's normal exit on 2 H200s (minutes, holding the
    # parent's stdout). Nothing is left to save: leave without the interpreter's finalisation.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""What running the executor in its own process would cost per step: one Batch out and one StepResult back
through a pipe (pickle, as multiprocessing does), against building the same step in-process.

    python -m bench.executor_ipc

Decode batches of 1, 64 and 512 sequences with 48 pages each (768-token contexts, page size 16).
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
from multiprocessing.connection import Connection

from bench.common_gpu import MODEL_SHAPES, format_table
from bench.timing import median_ms
from pie_server.engine.step import (Batch, CommandResult, ForwardCommand, OutputResult, OutputSpec,
                                   SamplingParams, StepResult)
from pie_server.engine.executor.step_inputs import build_step_inputs

PAGES_PER_SEQ = 48


def decode_batch(num_seqs: int) -> Batch:
    spec = (OutputSpec(index=0, sampling=SamplingParams()),)
    return Batch(forwards=[ForwardCommand(
        token_ids=[5], positions=[760], page_ids=list(range(i * PAGES_PER_SEQ, (i + 1) * PAGES_PER_SEQ)),
        last_page_len=9, outputs=spec) for i in range(num_seqs)])


def _step_result(num_seqs: int) -> StepResult:
    return StepResult(results=tuple(CommandResult(outputs=(OutputResult(token_id=7),)) for _ in range(num_seqs)))


def _serve(conn: Connection) -> None:
    """The stand-in executor process: answers each Batch with a StepResult of the same size."""
    while data := conn.recv_bytes():
        conn.send_bytes(pickle.dumps(_step_result(len(pickle.loads(data).forwards)), protocol=5))


def main() -> None:
    cfg = MODEL_SHAPES["llama-3.1-8b"]
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
    server.start()
    rows = []
    for num_seqs in (1, 64, 512):
        batch = decode_batch(num_seqs)

        def round_trip() -> None:
            parent.send_bytes(pickle.dumps(batch, protocol=5))
            pickle.loads(parent.recv_bytes())

        round_trip()
        rows.append([num_seqs, median_ms(round_trip, 50, warmup=0), len(pickle.dumps(batch, protocol=5)),
                     median_ms(lambda: build_step_inputs(batch.forwards, cfg, 16, 1 << 20), 50, warmup=0)])
    parent.send_bytes(b"")
    server.join(timeout=5)
    print(format_table(["decode batch", "pipe round trip ms", "batch bytes", "in-process build_step_inputs ms"],
                       rows))


if __name__ == "__main__":
    main()

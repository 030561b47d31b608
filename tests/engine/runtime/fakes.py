"""Small fakes of the runtime's collaborators: a Control with pages as counters and a fake executor step,
and a byte-level tokenizer."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from pie_server.engine.config import EngineInfo
from pie_server.engine.control.api import ControlError, ControlStats, InstanceClosed, VirtualForward
from pie_server.engine.control.decoding import DecodeRequest, DecodeStream, decode_by_forwards, extend_room
from pie_server.engine.step import CommandResult, OutputResult
from pie_server.engine.types import InstanceId, TokenId, VirtualPageId


def next_token_rule(command: VirtualForward, vocab_size: int) -> TokenId:
    """Deterministic fake sampling: the token after the command's last token."""
    return (command.token_ids[-1] + 1) % vocab_size


class FakeControl:
    """Pages as counters with reference counts; forwards resolved in batches by a background 'executor'.

    Every forward pending when the executor thread wakes forms one batch (batch sizes are recorded).
    `sample` maps a command to the token its sampled outputs get.
    """

    def __init__(self, num_pages: int = 64, page_size: int = 4, vocab_size: int = 256, max_context_len: int = 256,
                 sample: Callable[[VirtualForward, int], TokenId] = next_token_rule, step_delay_s: float = 0.0) -> None:
        self.info = EngineInfo(num_pages=num_pages, page_size=page_size, max_context_len=max_context_len,
                               kv_bytes_per_page=1)
        self.vocab_size = vocab_size
        self._sample = sample
        self._step_delay_s = step_delay_s
        self._lock = threading.Condition()
        self._free = num_pages
        self._tables: dict[InstanceId, dict[VirtualPageId, int]] = {}  # virtual id -> physical id
        self._refs: dict[int, int] = {}
        self._next_physical = 0
        self._next_virtual: dict[InstanceId, int] = {}
        self._exports: dict[str, list[int]] = {}
        self._pending: list[tuple[InstanceId, VirtualForward, Future]] = []
        self._waiting_alloc: list[tuple[InstanceId, int, Future]] = []
        self.batch_sizes: list[int] = []
        self.commands: list[tuple[InstanceId, VirtualForward]] = []
        self.closed: list[InstanceId] = []
        self.extensions: list[tuple[InstanceId, list[int]]] = []  # extend_decode's calls
        self._stopping = False
        self._thread = threading.Thread(target=self._executor, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- decoding (through forward())
    can_decode_grammar = False  # grammars run in the host, forward by forward

    def decode(self, instance_id: InstanceId, request: DecodeRequest) -> DecodeStream:
        return decode_by_forwards(self, instance_id, request)

    def extend_decode(self, instance_id: InstanceId, stream: DecodeStream, page_ids: list[int],
                      num_pages_before: int) -> None:
        self.extensions.append((instance_id, list(page_ids)))
        extend_room(stream, page_ids, num_pages_before)

    def stop_decode(self, instance_id: InstanceId, stream: DecodeStream) -> None:
        stream.stop_requested = True

    # ---------------------------------------------------------------- instances and pages
    def open_instance(self, instance_id: InstanceId, max_pages: int | None = None) -> None:
        with self._lock:
            if instance_id in self._tables:
                raise ControlError(f"instance {instance_id} already open")
            self._tables[instance_id] = {}
            self._next_virtual[instance_id] = 0

    def close_instance(self, instance_id: InstanceId) -> None:
        with self._lock:
            table = self._tables.pop(instance_id, None)
            if table is None:
                return
            self.closed.append(instance_id)
            for physical in table.values():
                self._unref(physical)
            for entry in [p for p in self._pending if p[0] == instance_id]:
                self._pending.remove(entry)
                entry[2].set_exception(InstanceClosed(f"{instance_id} closed"))
            for entry in [w for w in self._waiting_alloc if w[0] == instance_id]:
                self._waiting_alloc.remove(entry)
                entry[2].set_exception(InstanceClosed(f"{instance_id} closed"))
            self._serve_waiting()

    def _table(self, instance_id: InstanceId) -> dict[VirtualPageId, int]:
        table = self._tables.get(instance_id)
        if table is None:
            raise InstanceClosed(f"unknown or closed instance {instance_id}")
        return table

    def _map(self, instance_id: InstanceId, physical: int) -> VirtualPageId:
        virtual = self._next_virtual[instance_id]
        self._next_virtual[instance_id] += 1
        self._tables[instance_id][virtual] = physical
        return virtual

    def _unref(self, physical: int) -> None:
        self._refs[physical] -= 1
        if self._refs[physical] == 0:
            del self._refs[physical]
            self._free += 1

    def _physical(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> list[int]:
        table = self._table(instance_id)
        missing = [p for p in page_ids if p not in table]
        if missing:
            raise ControlError(f"invalid page ids {missing} for instance {instance_id}")
        return [table[p] for p in page_ids]

    def allocate_pages(self, instance_id: InstanceId, num_pages: int) -> Future:
        future: Future = Future()
        with self._lock:
            self._table(instance_id)
            if num_pages <= 0:
                raise ControlError("num_pages must be positive")
            self._waiting_alloc.append((instance_id, num_pages, future))
            self._serve_waiting()
        return future

    def try_allocate_pages(self, instance_id: InstanceId, num_pages: int) -> list[int]:
        """At once if free and nobody waits, else none (the Controller's rule)."""
        with self._lock:
            if self._waiting_alloc or num_pages > self._free:
                self._table(instance_id)
                return []
            future = self.allocate_pages(instance_id, num_pages)
        return future.result()

    def _serve_waiting(self) -> None:
        while self._waiting_alloc and self._waiting_alloc[0][1] <= self._free:
            instance_id, count, future = self._waiting_alloc.pop(0)
            ids = []
            for _ in range(count):
                physical, self._next_physical = self._next_physical, self._next_physical + 1
                self._refs[physical] = 1
                self._free -= 1
                ids.append(self._map(instance_id, physical))
            future.set_result(ids)

    def free_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> None:
        with self._lock:
            physical = self._physical(instance_id, page_ids)
            for virtual, page in zip(page_ids, physical):
                del self._tables[instance_id][virtual]
                self._unref(page)
            self._serve_waiting()

    def copy_slots(self, instance_id: InstanceId, src_page_id: VirtualPageId, dst_page_id: VirtualPageId,
                   src_offset: int, dst_offset: int, num_slots: int) -> None:
        with self._lock:
            self._physical(instance_id, [src_page_id, dst_page_id])

    def mask_slots(self, instance_id: InstanceId, page_id: VirtualPageId, slot_mask: Sequence[bool]) -> None:
        with self._lock:
            self._physical(instance_id, [page_id])

    def share_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId]) -> list[VirtualPageId]:
        with self._lock:
            physical = self._physical(instance_id, page_ids)
            for page in physical:
                self._refs[page] += 1
            return [self._map(instance_id, page) for page in physical]

    def export_pages(self, instance_id: InstanceId, page_ids: Sequence[VirtualPageId], name: str) -> None:
        with self._lock:
            if name in self._exports:
                raise ControlError(f"export {name!r} exists")
            physical = self._physical(instance_id, page_ids)
            for page in physical:
                self._refs[page] += 1
            self._exports[name] = physical

    def import_pages(self, instance_id: InstanceId, name: str) -> list[VirtualPageId]:
        with self._lock:
            self._table(instance_id)
            if name not in self._exports:
                raise ControlError(f"no export named {name!r}")
            physical = self._exports[name]
            for page in physical:
                self._refs[page] += 1
            return [self._map(instance_id, page) for page in physical]

    def unexport_pages(self, name: str) -> None:
        with self._lock:
            physical = self._exports.pop(name, None)
            if physical is None:
                raise ControlError(f"no export named {name!r}")
            for page in physical:
                self._unref(page)

    def list_exports(self) -> list[str]:
        with self._lock:
            return sorted(self._exports)

    def prefix_lookup(self, instance_id: InstanceId, token_ids: Sequence[TokenId]) -> tuple[list[VirtualPageId], int]:
        with self._lock:
            self._table(instance_id)
            return [], 0

    def prefix_publish(self, instance_id: InstanceId, token_ids: Sequence[TokenId],
                       page_ids: Sequence[VirtualPageId]) -> None:
        with self._lock:
            self._physical(instance_id, page_ids)

    # ---------------------------------------------------------------- forwards
    def forward(self, instance_id: InstanceId, command: VirtualForward) -> Future:
        future: Future = Future()
        with self._lock:
            self._physical(instance_id, command.page_ids)
            self._pending.append((instance_id, command, future))
            self._lock.notify()
        return future

    def _executor(self) -> None:
        import time
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    return
                batch, self._pending = self._pending, []
                self.batch_sizes.append(len(batch))
                self.commands.extend((i, c) for i, c, _ in batch)
            if self._step_delay_s:
                time.sleep(self._step_delay_s)
            for _, command, future in batch:
                if not future.done():
                    future.set_result(self._result(command))

    def _result(self, command: VirtualForward) -> CommandResult:
        outputs = []
        for spec in command.outputs:
            if spec.sampling is not None:
                token = self._sample(command, self.vocab_size)
                top = tuple((token, -0.5) for _ in range(spec.sampling.num_logprobs or 0))
                outputs.append(OutputResult(token_id=token, logprob=-0.5, top_logprobs=top))
            else:
                outputs.append(OutputResult(distribution=tuple((t, 1.0 / spec.distribution_top_k)
                                                               for t in range(spec.distribution_top_k))))
        return CommandResult(outputs=tuple(outputs))

    # ---------------------------------------------------------------- introspection
    @property
    def num_free_pages(self) -> int:
        with self._lock:
            return self._free

    def stats(self) -> ControlStats:
        with self._lock:
            return ControlStats(num_pages=self.info.num_pages, num_free_pages=self._free,
                                num_instances=len(self._tables), num_running=0, num_waiting=len(self._waiting_alloc),
                                num_swapped=0, num_prefix_queries=0, num_prefix_hit_tokens=0,
                                num_prefix_query_tokens=0)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=5)


class ByteTokenizer:
    """Token id = byte value (vocab 256); decoding is UTF-8 with held-back partial characters."""

    def encode(self, text: str) -> list[TokenId]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[TokenId]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            add_generation_prompt: bool) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def vocabulary(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)]

    def new_decoder(self) -> "ByteDecoder":
        return ByteDecoder()


class ByteDecoder:
    def __init__(self) -> None:
        self._pending = b""

    def add(self, token_ids: Sequence[TokenId]) -> str:
        data = self._pending + bytes(token_ids)
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = data[cut:]
            return text
        self._pending = data
        return ""

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")

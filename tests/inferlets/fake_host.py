"""A fake inferlet host in plain CPython, for unit tests of pie_sdk's logic without Wasm.

The SDK is imported against componentize-py's generated bindings (whose functions are stubs) and the stubs
are replaced by this host's methods. The host keeps real page tables with reference counts and stores the
token written into every KV slot, so tests can see exactly what the SDK wrote where. Its "model" is a pure
function of the visible KV contents, so any mistake in pages, slots or positions changes the output.

Rules it enforces like the real host: writes into a shared page (refcount > 1) fail; bad page ids fail;
every error is raised as componentize_py_types.Err(message).
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pie_server.inferlets import SDK_DIR, WIT_DIR


PAGE_SIZE = 4
VOCAB_SIZE = 128  # ASCII: encode is ord(), decode is chr()
EOS = 10  # "\n"
MAX_CONTEXT = 512


def load_sdk(bindings_dir: Path) -> ModuleType:
    """Generate the bindings into bindings_dir and import pie_sdk against them."""
    script = "import sys\nfrom componentize_py import script\nsys.argv[0]='componentize-py'\nsys.exit(script())"
    subprocess.run([sys.executable, "-c", script, "-d", str(WIT_DIR), "-w", "inferlet", "bindings",
                    str(bindings_dir)], check=True, capture_output=True)
    for path in (str(bindings_dir), str(SDK_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module("pie_sdk")


def next_token(visible: list[int]) -> int:
    """The fake model: a lowercase letter determined by every visible token and its slot."""
    return 97 + sum((i + 1) * t for i, t in enumerate(visible)) % 26


@dataclass
class FakeHost:
    num_pages: int = 256
    arguments: list[str] = field(default_factory=list)
    started_ahead: bool = False  # a warm instance (runtime.started-ahead)
    inbox: list[str] = field(default_factory=list)  # messages from the client, oldest first
    slots: dict[int, list[int | None]] = field(default_factory=dict)  # physical page -> token per slot
    refcounts: dict[int, int] = field(default_factory=dict)
    table: dict[int, int] = field(default_factory=dict)  # virtual -> physical
    sent: list[tuple[int, str]] = field(default_factory=list)  # (channel, text)
    events: list[str] = field(default_factory=list)
    exports: dict[str, list[int]] = field(default_factory=dict)
    prefix: dict[tuple[int, ...], int] = field(default_factory=dict)  # page-aligned prefix -> physical page
    store: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail_forward: str | None = None  # the next forward fails with this message
    evict_after: int | None = None  # the next generation is cut after this many tokens: every page dropped
    _next_virtual: int = 100

    # -- wiring --------------------------------------------------------------------------------------

    def install(self, monkeypatch: Any) -> None:
        w = importlib.import_module("wit_world.imports")
        mods = {name: importlib.import_module(f"wit_world.imports.{name}") for name in
                ("kv", "forward", "generate", "tokenize", "model", "runtime", "messaging", "prefix_cache", "store")}
        host = self

        class Decoder:
            def __init__(self) -> None:
                self.pending: list[int] = []

            def add(self, token_ids: list[int]) -> str:
                return "".join(chr(t) for t in token_ids)

            def flush(self) -> str:
                return ""

            def __exit__(self, *exc: object) -> None:
                return None

        patches = {
            "kv": dict(allocate_pages=self.allocate_pages, free_pages=self.free_pages, copy_slots=self.copy_slots,
                       share_pages=self.share_pages, export_pages=self.export_pages,
                       import_pages=self.import_pages, unexport_pages=self.unexport_pages,
                       page_usage=self.page_usage),
            "forward": dict(forward=self.forward, forward_all=self.forward_all),
            "generate": dict(generate=self.generate, generate_all=self.generate_all),
            "tokenize": dict(encode=lambda text: [ord(c) for c in text], decode=self.decode, Decoder=Decoder,
                             apply_chat_template=self.apply_chat_template),
            "model": dict(info=self.info, list_models=lambda: ["fake"]),
            "runtime": dict(arguments=lambda: list(host.arguments), instance_id=lambda: "fake-1",
                            version=lambda: "0.1.0", started_ahead=lambda: host.started_ahead),
            "messaging": dict(send=lambda text: host.sent.append((0, text)),
                              send_on=lambda ch, text: host.sent.append((ch, text)),
                              send_event=lambda js: host.events.append(js),
                              receive=lambda timeout_ms: host.inbox.pop(0) if host.inbox else None),
            "prefix_cache": dict(lookup=self.prefix_lookup, publish=self.prefix_publish),
            "store": dict(get=self.store.get, set=self.store.__setitem__,
                          delete=lambda k: host.store.pop(k, None) is not None,
                          list_keys=lambda p: sorted(k for k in host.store if k.startswith(p))),
        }
        del w
        for mod_name, funcs in patches.items():
            for name, fn in funcs.items():
                monkeypatch.setattr(mods[mod_name], name, fn)

    def info(self) -> Any:
        from wit_world.imports import model
        return model.ModelInfo(name="fake", vocab_size=VOCAB_SIZE, page_size=PAGE_SIZE, max_context_len=MAX_CONTEXT,
                               chat_template="", bos_token_id=None, eos_token_ids=[EOS], stop_token_ids=[])

    # -- pages ---------------------------------------------------------------------------------------

    @property
    def num_used_pages(self) -> int:
        return len(self.refcounts)

    def allocate_pages(self, num_pages: int) -> list[int]:
        self.calls.append("allocate")
        if num_pages <= 0 or num_pages > self.num_pages - self.num_used_pages:
            raise _err(f"cannot allocate {num_pages} pages")
        free = [p for p in range(self.num_pages) if p not in self.refcounts][:num_pages]
        for page in free:
            self.refcounts[page] = 1
            self.slots[page] = [None] * PAGE_SIZE
        return [self._map(p) for p in free]

    def free_pages(self, page_ids: list[int]) -> None:
        self.calls.append("free")
        physical = self._resolve(page_ids)
        for vid, page in zip(page_ids, physical):
            del self.table[vid]
            self.refcounts[page] -= 1
            if not self.refcounts[page]:
                del self.refcounts[page], self.slots[page]

    def share_pages(self, page_ids: list[int]) -> list[int]:
        self.calls.append("share")
        physical = self._resolve(page_ids)
        for page in physical:
            self.refcounts[page] += 1
        return [self._map(p) for p in physical]

    def copy_slots(self, src: int, dst: int, src_offset: int, dst_offset: int, num_slots: int) -> None:
        self.calls.append("copy")
        [src_page, dst_page] = self._resolve([src, dst])
        if self.refcounts[dst_page] > 1:
            raise _err("copy into a shared page")
        if max(src_offset, dst_offset) + num_slots > PAGE_SIZE:
            raise _err("slot range out of the page")
        self.slots[dst_page][dst_offset:dst_offset + num_slots] = self.slots[src_page][src_offset:src_offset + num_slots]

    def export_pages(self, page_ids: list[int], name: str) -> None:
        if name in self.exports:
            raise _err(f"{name!r} is already exported")
        physical = self._resolve(page_ids)
        for page in physical:
            self.refcounts[page] += 1
        self.exports[name] = physical

    def import_pages(self, name: str) -> list[int]:
        if name not in self.exports:
            raise _err(f"no export {name!r}")
        return self.share_pages_physical(self.exports[name])

    def unexport_pages(self, name: str) -> None:
        for page in self.exports.pop(name):
            self.refcounts[page] -= 1

    def page_usage(self, page_ids: list[int] | None) -> Any:
        from wit_world.imports import kv
        self.calls.append("page_usage")
        physical = self._resolve(list(self.table) if page_ids is None else page_ids)
        distinct = set(physical)
        return kv.PageCounts(len(physical), len(distinct), sum(1 for p in distinct if self.refcounts[p] > 1))

    def share_pages_physical(self, physical: list[int]) -> list[int]:
        for page in physical:
            self.refcounts[page] += 1
        return [self._map(p) for p in physical]

    def prefix_lookup(self, token_ids: list[int]) -> Any:
        from wit_world.imports import prefix_cache
        physical: list[int] = []
        while (len(physical) + 1) * PAGE_SIZE <= len(token_ids):
            page = self.prefix.get(tuple(token_ids[:(len(physical) + 1) * PAGE_SIZE]))
            if page is None:
                break
            physical.append(page)
        return prefix_cache.PrefixMatch(self.share_pages_physical(physical), len(physical) * PAGE_SIZE)

    def prefix_publish(self, token_ids: list[int], page_ids: list[int]) -> None:
        for i, page in enumerate(self._resolve(page_ids)):
            key = tuple(token_ids[:(i + 1) * PAGE_SIZE])
            if key not in self.prefix:
                self.prefix[key] = page
                self.refcounts[page] += 1

    # -- forward and generate ------------------------------------------------------------------------

    def forward(self, request: Any, log: bool = True) -> list[Any]:
        from wit_world.imports import forward
        if log:
            self.calls.append("forward")
        if self.fail_forward is not None:
            message, self.fail_forward = self.fail_forward, None
            raise _err(message)
        visible = self._write(request.page_ids, request.last_page_len, request.token_ids, request.positions)
        base = len(visible) - len(request.token_ids)
        outputs = []
        for out in request.outputs:
            token = next_token(visible[:base + out.index + 1])
            if isinstance(out.kind, forward.OutputKind_Sample):
                outputs.append(forward.Output(token, None, [], []))
            else:
                from wit_world.imports import types
                outputs.append(forward.Output(None, None, [], [types.TokenProb(token, 0.9)][:out.kind.value]))
        return outputs

    def forward_all(self, requests: list[Any]) -> list[Any]:
        from componentize_py_types import Err, Ok
        self.calls.append("forward_all")
        results: list[Any] = []
        for request in requests:
            try:
                results.append(Ok(self.forward(request, log=False)))
            except Err as error:
                results.append(error)
        return results

    def generate(self, request: Any) -> Any:
        from wit_world.imports import generate, types
        self.calls.append("generate")
        pages, last_len = list(request.page_ids), request.last_page_len
        inputs, position = list(request.input_token_ids), request.position
        stops = set(request.stop_token_ids) | (set() if request.ignore_eos else {EOS})
        sampled: list[int] = []
        text, finish = "", types.FinishReason.LENGTH
        while True:
            pages, last_len, visible = self._grow_and_write(pages, last_len, inputs, position)
            position += len(inputs)
            token = next_token(visible)
            sampled.append(token)
            if token in stops:
                finish = types.FinishReason.STOP
                break
            text += chr(token)
            cut = min((text.find(s) for s in request.stop_strings if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], types.FinishReason.STOP
                break
            if len(sampled) >= request.max_tokens:
                break
            if len(sampled) == self.evict_after:  # the server's last resort: the instance's KV is dropped
                self.evict_after = None
                self.table.clear(), self.refcounts.clear(), self.slots.clear()
                if request.stream_channel is not None:
                    self.sent.extend((request.stream_channel, c) for c in text)
                return generate.Generation(token_ids=sampled, text=text, finish_reason=types.FinishReason.EVICTED,
                                           logprobs=[], page_ids=[], last_page_len=0, pending_token_ids=[],
                                           next_position=position)
            inputs = [token]
        if request.stream_channel is not None:  # streamed per character, after the stop-string cut
            self.sent.extend((request.stream_channel, c) for c in text)
        return generate.Generation(token_ids=sampled, text=text, finish_reason=finish, logprobs=[],
                                   page_ids=pages, last_page_len=last_len, pending_token_ids=[sampled[-1]],
                                   next_position=position)

    def generate_all(self, requests: list[Any]) -> list[Any]:
        from componentize_py_types import Err, Ok
        results: list[Any] = []
        for request in requests:
            try:
                results.append(Ok(self.generate(request)))
            except Err as error:
                results.append(error)
        return results

    def apply_chat_template(self, messages_json: str, tools_json: str | None, add_generation_prompt: bool) -> str:
        import json
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in json.loads(messages_json))
        return text + ("<assistant>" if add_generation_prompt else "")

    def decode(self, token_ids: list[int]) -> str:
        if any(not 0 <= t < VOCAB_SIZE for t in token_ids):
            raise _err("token id out of range")
        return "".join(chr(t) for t in token_ids)

    # -- internals -----------------------------------------------------------------------------------

    def _grow_and_write(self, pages: list[int], last_len: int, token_ids: list[int],
                        position: int) -> tuple[list[int], int, list[int]]:
        total = ((len(pages) - 1) * PAGE_SIZE + last_len if pages else 0) + len(token_ids)
        needed = -(-total // PAGE_SIZE)
        if needed > len(pages):
            pages = pages + self.allocate_pages(needed - len(pages))
        last_len = total - (needed - 1) * PAGE_SIZE
        visible = self._write(pages, last_len, token_ids, list(range(position, position + len(token_ids))))
        return pages, last_len, visible

    def _write(self, page_ids: list[int], last_page_len: int, token_ids: list[int], positions: list[int]) -> list[int]:
        """Write token_ids into the last slots of the context; returns every visible token in slot order."""
        if len(positions) != len(token_ids) or not page_ids or not 0 < last_page_len <= PAGE_SIZE:
            raise _err("bad forward shape")
        physical = self._resolve(page_ids)
        context_len = (len(page_ids) - 1) * PAGE_SIZE + last_page_len
        start = context_len - len(token_ids)
        if start < 0:
            raise _err("more tokens than slots")
        for i, token in enumerate(token_ids):
            page = physical[(start + i) // PAGE_SIZE]
            if self.refcounts[page] > 1:
                raise _err(f"write into shared page {page_ids[(start + i) // PAGE_SIZE]}")
            if positions[i] != start + i:  # the SDK's contexts are standard: slot i holds position i
                raise _err(f"position {positions[i]} written into slot {start + i}")
            self.slots[page][(start + i) % PAGE_SIZE] = token
        visible = [self.slots[physical[s // PAGE_SIZE]][s % PAGE_SIZE] for s in range(context_len)]
        if any(t is None for t in visible):
            raise _err("the context reads an unwritten slot")
        return visible  # type: ignore[return-value]

    def _map(self, page: int) -> int:
        self._next_virtual += 1
        self.table[self._next_virtual] = page
        return self._next_virtual

    def _resolve(self, page_ids: list[int]) -> list[int]:
        bad = [p for p in page_ids if p not in self.table]
        if bad:
            raise _err(f"unknown page ids {bad}")
        return [self.table[p] for p in page_ids]


def reference_generation(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model generates greedily after prompt (including a final eos)."""
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(seq)
        out.append(token)
        seq.append(token)
        if token == EOS:
            break
    return out


def _err(message: str) -> Exception:
    from componentize_py_types import Err
    return Err(message)

"""The runtime's public API over raw-ABI WAT components."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pie_server.engine.runtime.messages import Event, Terminated, Text
from pie_server.engine.runtime.runtime import Runtime
from tests.engine.runtime.conftest import make_runtime, wat
from tests.engine.runtime.fakes import FakeControl


def test_forward_loop_feeds_back_sampled_tokens(runtime: Runtime, control: FakeControl) -> None:
    handle = runtime.launch(runtime.load(wat("forward_loop.wat", NUM_STEPS=5)))
    assert handle.messages(timeout=30) == [Text("done"), Terminated(ok=True)]
    commands = [c for i, c in control.commands if i == handle.id]
    # the fake samples last token + 1; the guest feeds each sampled token back
    assert [list(c.token_ids) for c in commands] == [[1], [2], [3], [4], [5]]
    assert [list(c.positions) for c in commands] == [[0], [1], [2], [3], [4]]
    sampling = commands[0].outputs[0].sampling
    assert sampling is not None and sampling.is_greedy and sampling.top_p == 1.0


def test_messages_events_and_client_input(runtime: Runtime, control: FakeControl) -> None:
    handle = runtime.launch(runtime.load(wat("messages.wat")))
    assert handle.get_message(timeout=10) == Text("hello")
    assert handle.get_message(timeout=10) == Event('{"n": 1}')  # the invalid JSON event was refused
    handle.send("ping from client")
    assert handle.messages(timeout=10) == [Text("ping from client"), Terminated(ok=True)]
    assert control.num_free_pages == control.info.num_pages  # its 3 pages were freed by the host
    assert handle.log_path is not None and Path(handle.log_path).exists()  # the fixture sets a log_dir


def test_async_next_message(runtime: Runtime) -> None:
    handle = runtime.launch(runtime.load(wat("forward_loop.wat", NUM_STEPS=3)))

    async def consume() -> list[object]:
        received = [await handle.next_message()]
        while not isinstance(received[-1], Terminated):
            received.append(await asyncio.wait_for(handle.next_message(), 10))
        return received
    assert asyncio.run(consume()) == [Text("done"), Terminated(ok=True)]


def test_kill_stops_a_waiting_instance(runtime: Runtime, control: FakeControl) -> None:
    handle = runtime.launch(runtime.load(wat("messages.wat")))
    assert handle.get_message(timeout=10) == Text("hello")
    handle.kill()
    messages = handle.messages(timeout=10)
    assert messages[-1] == Terminated(ok=False, error="killed by the client")
    assert control.num_free_pages == control.info.num_pages


def test_bad_programs_are_refused(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="not a valid WebAssembly component"):
        runtime.load(b"\0asm garbage")
    with pytest.raises(KeyError):
        runtime.launch("0" * 64)


def test_a_component_of_another_world_or_a_core_module_is_refused_at_load(runtime: Runtime) -> None:
    import wasmtime
    with pytest.raises(ValueError, match="does not export the function `run`"):
        runtime.load(wasmtime.wat2wasm("(component)"))
    with pytest.raises(ValueError, match="imports acme:other/api"):
        runtime.load(wasmtime.wat2wasm('(component (import "acme:other/api" (instance)))'))
    with pytest.raises(ValueError, match="a core WebAssembly module, not a component"):
        runtime.load(wasmtime.wat2wasm("(module)"))


def test_compiled_code_cache_hits_on_disk(control: FakeControl, tmp_path: Path) -> None:
    wasm = wat("forward_loop.wat", NUM_STEPS=2)
    first = make_runtime(control, tmp_path)
    try:
        program = first.load(wasm)
        assert first.load(wasm) == program and first.programs.num_compiled == 1  # memory hit
        assert first.programs.artifact_path(program).exists()
    finally:
        first.close()
    second = make_runtime(control, tmp_path)
    try:
        assert second.load(wasm) == program
        assert second.programs.num_compiled == 0 and second.programs.num_disk_hits == 1
        assert second.launch(program).messages(timeout=10)[-1] == Terminated(ok=True)
    finally:
        second.close()


def test_many_concurrent_instances_share_batches(runtime: Runtime, control: FakeControl) -> None:
    program = runtime.load(wat("forward_loop.wat", NUM_STEPS=10))
    handles = [runtime.launch(program) for _ in range(20)]
    assert all(h.messages(timeout=30)[-1] == Terminated(ok=True) for h in handles)
    assert sum(control.batch_sizes) == 200
    assert max(control.batch_sizes) > 1
    assert control.num_free_pages == control.info.num_pages


def test_decoder_resource_lifecycle(runtime: Runtime) -> None:
    handle = runtime.launch(runtime.load(wat("decoder.wat")))
    assert handle.messages(timeout=10) == [Text(""), Text("\u00e9"), Text(""), Terminated(ok=True)]
    assert runtime._host.decoders == {}  # the guest's drop reached the host destructor

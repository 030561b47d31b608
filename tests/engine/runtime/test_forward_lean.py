"""The lean per-token path of `forward`: register-sampler, drop-sampler, forward-tokens (raw-ABI WAT guests
and direct calls), and the scheduler's lean waits under it."""
from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path
from typing import Any

import pytest

from pie_server.engine.step import SamplingParams
from pie_server.engine.runtime import api_forward_lean, ffi_async
from pie_server.engine.runtime.api_forward_lean import MAX_SAMPLERS_PER_INSTANCE, SamplerTable
from pie_server.engine.runtime.host import Host, TenantStore
from pie_server.engine.runtime.hostfn import GuestError
from pie_server.engine.runtime.instance import InstanceState
from pie_server.engine.runtime.messages import Terminated, Text
from pie_server.engine.runtime.config import RuntimeConfig
from pie_server.engine.runtime.runtime import Runtime
from tests.engine.runtime.conftest import MODEL, make_runtime, wat
from tests.engine.runtime.fakes import FakeControl

GREEDY = {"TEMPERATURE": "0.0", "SAMPLER_OFFSET": "0", "NUM_LOGPROBS_CASE": "0"}


def lean_guest(steps: int, **settings: str) -> bytes:
    return wat("forward_tokens_loop.wat", NUM_STEPS=steps, **{**GREEDY, **settings})


def test_forward_tokens_loop_feeds_back_sampled_tokens(runtime: Runtime, control: FakeControl) -> None:
    handle = runtime.launch(runtime.load(lean_guest(6, TEMPERATURE="0.5")))
    assert handle.messages(timeout=30) == [Text("done"), Terminated(ok=True)]
    commands = [c for i, c in control.commands if i == handle.id]
    # the fake samples last token + 1; the guest feeds each sampled token back
    assert [list(c.token_ids) for c in commands] == [[1], [2], [3], [4], [5], [6]]
    assert [list(c.positions) for c in commands] == [[0], [1], [2], [3], [4], [5]]
    assert all(c.last_page_len == 1 and len(c.page_ids) == 1 and c.attention_mask is None for c in commands)
    sampling = commands[0].outputs[0].sampling
    assert sampling == SamplingParams(temperature=0.5)
    assert [c.outputs[0].index for c in commands] == [0] * 6
    assert all(c.outputs is commands[0].outputs for c in commands)  # checked and built once, then reused
    assert control.num_free_pages == control.info.num_pages


@pytest.mark.parametrize("settings, error", [
    ({"SAMPLER_OFFSET": "7"}, "sampler 7 is not registered"),
    ({"NUM_LOGPROBS_CASE": "1"}, "needs num-logprobs none"),
    ({"TEMPERATURE": "-1.0"}, "temperature must be >= 0"),
    ({"TEMPERATURE": "nan"}, "temperature must be finite"),
])
def test_bad_samplers_are_errors_for_the_guest(runtime: Runtime, control: FakeControl, settings: dict[str, str],
                                               error: str) -> None:
    end = runtime.launch(runtime.load(lean_guest(3, **settings))).messages(timeout=30)[-1]
    assert isinstance(end, Terminated) and not end.ok
    assert (end.error or "").startswith("inferlet returned an error: ") and error in (end.error or "")
    assert control.num_free_pages == control.info.num_pages


def test_lean_calls_of_many_instances_share_batches(runtime: Runtime, control: FakeControl) -> None:
    program = runtime.load(lean_guest(10))
    handles = [runtime.launch(program) for _ in range(20)]
    assert all(h.messages(timeout=30)[-1] == Terminated(ok=True) for h in handles)
    assert sum(control.batch_sizes) == 200 and max(control.batch_sizes) > 1
    assert control.num_free_pages == control.info.num_pages


def test_kill_while_waiting_in_forward_tokens(tmp_path: Path) -> None:
    control = FakeControl(num_pages=64, page_size=MODEL.page_size, vocab_size=MODEL.vocab_size,
                          max_context_len=MODEL.max_context_len, step_delay_s=0.3)
    runtime = make_runtime(control, tmp_path)
    try:
        short = runtime.load(lean_guest(2))
        victim, other = runtime.launch(runtime.load(lean_guest(50))), runtime.launch(short)
        deadline = time.monotonic() + 10
        while not any(i == victim.id for i, _ in control.commands) and time.monotonic() < deadline:
            time.sleep(0.01)
        victim.kill()  # it waits in forward-tokens: its Future completes after it is gone
        assert victim.messages(timeout=10)[-1] == Terminated(ok=False, error="killed by the client")
        assert other.messages(timeout=10) == [Text("done"), Terminated(ok=True)]
        time.sleep(0.4)  # the victim's last step completes now, and must be ignored
        assert runtime.launch(short).messages(timeout=10)[-1] == Terminated(ok=True)
        assert control.num_free_pages == control.info.num_pages
    finally:
        runtime.close()
        control.stop()


def test_a_guest_with_other_import_types_stops_alone(runtime: Runtime, control: FakeControl) -> None:
    text = (Path(__file__).parent / "wat" / "forward_tokens_loop.wat").read_text()
    text = text.replace('(param "token-ids" (list u32))', '(param "token-ids" (list u64))', 1)
    for key, value in {**GREEDY, "NUM_STEPS": "3"}.items():
        text = text.replace(key, value)
    import wasmtime
    liar = runtime.launch(runtime.load(wasmtime.wat2wasm(text)))
    honest = runtime.launch(runtime.load(lean_guest(3)))
    end = liar.messages(timeout=30)[-1]
    assert isinstance(end, Terminated) and not end.ok
    assert "forward.forward-tokens" in (end.error or "") and "holds other values" in (end.error or "")
    assert honest.messages(timeout=30) == [Text("done"), Terminated(ok=True)]
    assert control.num_free_pages == control.info.num_pages


# ------------------------------------------------------------------------------------ direct calls

@pytest.fixture
def host(control: FakeControl) -> Host:
    return Host(control=control, tokenizer=None, model=MODEL, config=RuntimeConfig(),  # type: ignore[arg-type]
                call_later=lambda delay, fn: None, run_blocking=lambda fn: None, store=TenantStore(1 << 10))


def _impls(host: Host) -> dict[str, Any]:
    return {fn.name: fn.impl for fn in api_forward_lean.functions(host)}


def _instance(control: FakeControl) -> InstanceState:
    inst = InstanceState(id="lean-test", program_hash="", arguments=(), tenant="t",  # type: ignore[arg-type]
                         deadline=math.inf)
    control.open_instance(inst.id)
    return inst


@pytest.mark.parametrize("args, error", [
    (((), (), (0,), 1, (), 0), "at least one token"),
    (((1, 2), (0,), (0,), 2, (), 0), "same length"),
    (((1,), (0,), (), 1, (), 0), "at least one page"),
    (((1,), (0,), (0,), 0, (), 0), "last-page-len must be in [1, 4]"),
    (((1,), (0,), (0,), 5, (), 0), "last-page-len must be in [1, 4]"),
    (((1, 2, 3), (0, 1, 2), (0,), 2, (), 0), "must hold all token-ids"),
    (((1,), (0,), tuple(range(65)), 4, (), 0), "context exceeds 256 tokens"),
    (((256,), (0,), (0,), 1, (), 0), "token id 256 is outside the vocabulary"),
    (((1,), (256,), (0,), 1, (), 0), "a position exceeds"),
    (((1,), (0,), (0,), 1, (1,), 0), "output index 1 is not among the 1 tokens"),
    (((1,), (0,), (0,), 1, (0,), 3), "sampler 3 is not registered"),
])
def test_forward_tokens_checks_its_arguments(host: Host, control: FakeControl, args: tuple, error: str) -> None:
    impls = _impls(host)
    inst = _instance(control)
    assert impls["register-sampler"](inst, SamplingParams()) == ("ok", 0)
    with pytest.raises(GuestError) as raised:
        impls["forward-tokens"](inst, *args)
    assert error in str(raised.value)
    assert control.commands == []


def test_forward_tokens_prefill_needs_no_sampler(host: Host, control: FakeControl) -> None:
    inst = _instance(control)
    page = control.allocate_pages(inst.id, 1).result(timeout=5)[0]
    future = _impls(host)["forward-tokens"](inst, (5, 6, 7), (0, 1, 2), (page,), 3, (), 99)
    assert future.result(timeout=10).outputs == ()
    (_, command), = control.commands
    assert list(command.token_ids) == [5, 6, 7] and command.outputs == ()


def test_sampler_table_limits_ids_and_cached_specs() -> None:
    table = SamplerTable()
    greedy, hot = SamplingParams(), SamplingParams(temperature=1.0)
    ids = [table.register(greedy) for _ in range(MAX_SAMPLERS_PER_INSTANCE)]
    assert ids == list(range(MAX_SAMPLERS_PER_INSTANCE))
    with pytest.raises(GuestError, match="at most 1024 live samplers"):
        table.register(greedy)
    specs = table.build_specs(5, (0, 2))
    assert [(s.index, s.sampling) for s in specs] == [(0, greedy), (2, greedy)] and table.specs[(5, (0, 2))] is specs
    table.drop(5)
    table.drop(5)  # unknown ids are ignored
    assert (5, (0, 2)) not in table.specs
    with pytest.raises(GuestError, match="sampler 5 is not registered"):
        table.build_specs(5, (0,))
    assert table.register(hot) == MAX_SAMPLERS_PER_INSTANCE  # ids are not reused at once
    wrapping = SamplerTable()
    wrapping._next_id = 2**32 - 1
    assert [wrapping.register(greedy), wrapping.register(greedy)] == [2**32 - 1, 0]


def test_drop_sampler_via_the_host_function(host: Host, control: FakeControl) -> None:
    impls = _impls(host)
    inst = _instance(control)
    assert impls["register-sampler"](inst, SamplingParams()) == ("ok", 0)
    impls["drop-sampler"](inst, 0)
    impls["drop-sampler"](inst, 12345)
    with pytest.raises(GuestError, match="sampler 0 is not registered"):
        impls["forward-tokens"](inst, (1,), (0,), (0,), 1, (0,), 0)


def test_done_flag_is_a_strlen_continuation() -> None:
    flag = ffi_async.DoneFlag()
    callback, env, finalizer = ffi_async._CONTINUATION.unpack(flag.image)
    strlen = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p)(callback)
    assert finalizer == 0 and not flag.done and strlen(env) == 0
    flag.set(True)
    assert flag.done and strlen(env) == 1
    assert ffi_async.DoneFlag(done=True).done

"""The step log (PIE_STEP_LOG, engine/control/step_log.py): one line per step the executor ran, with what it
held and when it was submitted and delivered, pipelined or not."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pie_server.engine.control.api import VirtualForward
from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.step import OutputSpec, SamplingParams
from pie_server.engine.types import InstanceId
from tests.engine.control.fake_executor import FakeExecutor

pytestmark = pytest.mark.timeout(60)
PAGE_SIZE = 4


def _prompt_then_decodes(controller: Controller, prompt: list[int], num_decodes: int) -> None:
    instance = InstanceId("a")
    controller.open_instance(instance)
    pages = controller.allocate_pages(instance, 4).result(timeout=10)
    greedy = [OutputSpec(0, SamplingParams())]
    result = controller.forward(instance, VirtualForward(
        prompt, list(range(len(prompt))), pages[:1], len(prompt), [OutputSpec(len(prompt) - 1, SamplingParams())]
    )).result(timeout=10)
    for pos in range(len(prompt), len(prompt) + num_decodes):
        num_pages = pos // PAGE_SIZE + 1
        result = controller.forward(instance, VirtualForward(
            [result.outputs[0].token_id], [pos], pages[:num_pages], pos - (num_pages - 1) * PAGE_SIZE + 1,
            greedy)).result(timeout=10)
    controller.close_instance(instance)


def _logging(path: Path, pipeline: bool) -> tuple[Controller, FakeExecutor]:
    """A started Controller whose steps are logged to path."""
    executor = FakeExecutor(num_pages=16, page_size=PAGE_SIZE)
    controller = Controller(executor, ControlConfig(pipeline=pipeline, step_log=str(path)))
    controller.start()
    return controller, executor


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipelined"])
def test_every_executed_step_is_logged_with_its_tokens(tmp_path: Path, pipeline: bool) -> None:
    path = tmp_path / "steps.jsonl"
    controller, executor = _logging(path, pipeline)
    try:
        _prompt_then_decodes(controller, [5, 6, 7], num_decodes=6)
    finally:
        controller.stop()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ran = [b for b in executor.batches if b.forwards]
    assert [line["step"] for line in lines] == [b.step_id for b in ran]
    assert [(line["forwards"], line["tokens"]) for line in lines] == \
        [(len(b.forwards), sum(len(c.token_ids) for c in b.forwards)) for b in ran]
    assert [(line["prefill_forwards"], line["prefill_tokens"]) for line in lines] == [(1, 3)] + [(0, 0)] * 6
    assert all(line["submitted"] <= line["delivered"] for line in lines)
    parts = ("form_ms", "submit_ms", "wait_ms", "deliver_ms")
    assert all(line[p] >= 0 for line in lines for p in parts)
    assert all(line["wait_ms"] <= (line["delivered"] - line["submitted"]) * 1e3 + 1e-3 for line in lines)
    assert [line["delivered"] for line in lines] == sorted(line["delivered"] for line in lines)


def test_each_line_has_the_loop_threads_cpu_time_and_the_collections_since_the_last_submission() -> None:
    """cpu_ms counts the logging thread's CPU only (a sleep adds none, a busy loop does); gc_ms the collections
    run in between; stop() stops timing them."""
    import gc
    import io

    from pie_server.engine.control.step_log import StepLog
    from pie_server.engine.step import Batch, ForwardCommand

    out = io.StringIO()
    log = StepLog(out)
    one = [ForwardCommand(token_ids=[1], positions=[0], page_ids=[0], last_page_len=1, outputs=[])]

    def step(step_id: int) -> None:
        log.submitted(Batch(forwards=one, step_id=step_id), time.monotonic(), 0.0, 0.0)
        log.delivered(step_id, 0.0, 0.0)

    step(1)
    time.sleep(0.1)  # off the CPU
    step(2)
    busy_until = time.thread_time() + 0.05
    while time.thread_time() < busy_until:
        pass
    gc.collect()
    step(3)
    log.stop()
    gc.collect()
    step(4)
    log.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["cpu_ms"] == 0.0 and lines[0]["gc_ms"] == 0.0  # the first: no cycle before it
    assert lines[1]["cpu_ms"] < 50  # 100 ms of wall time, asleep
    assert lines[1]["gc_ms"] == 0.0
    assert lines[2]["cpu_ms"] >= 50
    assert lines[2]["gc_ms"] > 0.0
    assert lines[3]["gc_ms"] == 0.0  # stopped


def test_lines_are_on_disk_once_the_loop_is_idle(tmp_path: Path) -> None:
    """A server killed after its load (no stop(), as `kill` on the engine core) keeps the log of its last steps:
    the buffer is written whenever a step finds nothing to do."""
    path = tmp_path / "steps.jsonl"
    controller, _ = _logging(path, pipeline=True)
    try:
        _prompt_then_decodes(controller, [5, 6, 7], num_decodes=3)
        deadline = time.monotonic() + 10
        while len(path.read_text().splitlines()) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(path.read_text().splitlines()) == 4  # fewer than FLUSH_LINES, before stop()
    finally:
        controller.stop()


def test_no_log_unless_asked() -> None:
    with pytest.raises(ValueError, match="step_log"):
        ControlConfig(step_log="")
    assert ControlConfig().step_log is None


def test_the_summary_times_steps_by_rows_and_prefill(tmp_path: Path) -> None:
    """scripts/step_log_summary.py: a step's time runs from the later of its submission and the previous delivery
    (pipelined steps wait for the device, idle stretches are not theirs); rows bands and prefill split them."""
    import subprocess
    import sys

    def line(step: int, submitted: float, delivered: float, forwards: int, prefill_tokens: int) -> str:
        return json.dumps({"step": step, "submitted": submitted, "delivered": delivered, "forwards": forwards,
                           "tokens": forwards + prefill_tokens, "prefill_forwards": int(prefill_tokens > 0),
                           "prefill_tokens": prefill_tokens})

    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join([
        line(1, 0.000, 0.010, 16, 0),  # 10 ms
        line(2, 0.001, 0.016, 16, 0),  # submitted while 1 ran: 6 ms from 1's delivery
        line(3, 0.012, 0.030, 16, 40),  # 14 ms, with prefill
        line(4, 1.000, 1.002, 1, 0)]) + "\n")  # after an idle second: 2 ms
    script = Path(__file__).resolve().parents[3] / "scripts" / "step_log_summary.py"
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    header, one, decodes, prefills, total = done.stdout.splitlines()
    # columns: band, kind (2 words), steps, rows, tokens, ms median, p90, total, then the host parts ("-": none)
    assert one.split()[:3] == ["1-1", "decode", "only"] and float(one.split()[6]) == pytest.approx(2.0)
    assert decodes.split()[:4] == ["2-16", "decode", "only", "2"] and float(decodes.split()[8]) == pytest.approx(16)
    assert prefills.split()[:4] == ["2-16", "with", "prefill", "1"]
    assert float(prefills.split()[6]) == pytest.approx(14.0) and total.startswith("4 steps")
    assert one.split()[-1] == "-"


def test_the_windows_of_an_agentic_run_are_summarised_apart(tmp_path: Path) -> None:
    """--windows: one summary per level and mode of a bench.agentic JSON, over the steps submitted in its window_s,
    with the share of the window in which a step ran."""
    import subprocess
    import sys

    steps = tmp_path / "steps.jsonl"
    steps.write_text("\n".join(json.dumps({"step": i, "submitted": t, "delivered": t + 0.1, "forwards": 2,
                                           "tokens": 2, "prefill_forwards": 0, "prefill_tokens": 0,
                                           "form_ms": 1.0 + i, "submit_ms": 2.0, "wait_ms": 90.0, "deliver_ms": 3.0})
                               for i, t in enumerate([1.0, 1.5, 2.0, 5.0, 5.5])) + "\n")
    agentic = tmp_path / "agentic.json"
    agentic.write_text(json.dumps({"levels": [{"concurrency": 2, "num_tasks": 4, "speedup": 1.5,
                                               "inferlet": {"tasks_per_s": 3.0, "window_s": [0.5, 2.5]},
                                               "client": {"tasks_per_s": 2.0, "window_s": [4.5, 6.5]}}]}))
    script = Path(__file__).resolve().parents[3] / "scripts" / "step_log_summary.py"
    done = subprocess.run([sys.executable, str(script), str(steps), "--windows", str(agentic)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "== concurrency 2, inferlet: 3.00 tasks/s"
    assert out[1] == "3 steps in 2.0 s, a step running 15 % of it"  # 3 x 100 ms of 2 s
    assert out[3].split()[-7:] == ["2.00", "/", "2.00", "/", "90.00", "/", "3.00"]  # form 1, 2, 3: median 2
    client = out.index("== concurrency 2, client: 2.00 tasks/s")
    assert out[client + 1] == "2 steps in 2.0 s, a step running 10 % of it"


def _cycle_lines(tmp_path: Path, lines: list[str]) -> list[str]:
    """scripts/step_log_summary.py --cycles over a log of these lines: its output from the cycles' header on."""
    import subprocess
    import sys

    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    script = Path(__file__).resolve().parents[3] / "scripts" / "step_log_summary.py"
    done = subprocess.run([sys.executable, str(script), str(path), "--cycles"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    return out[next(k for k, text in enumerate(out) if text.startswith("cycles of decode-only steps")):]


def test_cycles_split_the_pipelined_loop_between_submissions(tmp_path: Path) -> None:
    """--cycles: from one decode-only step's submission to the next, the parts the loop logs (this step's submit,
    the step before's wait and deliver, the next one's form) and the rest; steps with prefill or under 17 rows
    are left out, and the slowest tenth is shown apart."""

    def step(i: int, submitted: float, forwards: int = 32, prefill: int = 0, form: float = 0.1) -> str:
        return json.dumps({"step": i, "submitted": submitted, "delivered": submitted + 0.002, "forwards": forwards,
                           "tokens": forwards + prefill, "prefill_forwards": int(prefill > 0),
                           "prefill_tokens": prefill, "form_ms": form, "submit_ms": 0.5, "wait_ms": 0.0,
                           "deliver_ms": 0.2})

    # submissions 1 ms apart, one 3 ms gap (before step 12); step 3 holds prefill, step 8 has 4 rows
    times = [0.001 * i + (0.002 if i >= 12 else 0.0) for i in range(20)]
    lines = [step(i, t, forwards=4 if i == 8 else 32, prefill=64 if i == 3 else 0) for i, t in enumerate(times)]
    out = _cycle_lines(tmp_path, lines)
    median, _, slowest = out[1:4]
    # 20 steps -> 18 triples; those touching step 3 (3) or step 8 (3) are left out: 12 cycles
    assert median.split()[:2] == ["median", "(12)"]
    # form 0.1 + submit 0.5 + wait 0 + deliver 0.2 = 0.8 of a 1 ms cycle: the rest 0.2
    assert median.split()[2:] == ["0.10", "/", "0.50", "/", "0.00", "/", "0.20", "/", "0.20", "=", "1.00"]
    # the slowest tenth of 12 is one cycle: the 3 ms one, its extra 2 ms in the rest
    assert slowest.split()[-3:] == ["2.20", "=", "3.00"]


def test_cycles_split_the_loop_threads_time_on_and_off_the_cpu(tmp_path: Path) -> None:
    """With cpu_ms and gc_ms in the log, each cycle also says how much of it the loop thread ran, how long it was
    off the CPU other than waiting for the device, and the collections' time."""
    def step(i: int, submitted: float, cpu: float) -> str:
        return json.dumps({"step": i, "submitted": submitted, "delivered": submitted + 0.002, "forwards": 32,
                           "tokens": 32, "prefill_forwards": 0, "prefill_tokens": 0, "form_ms": 0.1,
                           "submit_ms": 0.5, "wait_ms": 0.1, "deliver_ms": 0.2, "cpu_ms": cpu,
                           "gc_ms": 0.3 if i == 15 else 0.0})

    # 1 ms cycles with 0.8 ms of the loop's CPU; the cycle ending at step 15 is 3 ms, of which the loop ran 1.0
    times = [0.001 * i + (0.002 if i >= 15 else 0.0) for i in range(20)]
    lines = [step(i, t, cpu=1.0 if i == 15 else 0.8) for i, t in enumerate(times)]
    out = _cycle_lines(tmp_path, lines)
    assert out[0].endswith("| loop CPU / off CPU (not the wait) / gc")
    median, _, slowest = out[1:4]
    # 1.00 total - 0.80 on the CPU - 0.10 waiting for the device: 0.10 off the CPU otherwise
    assert median.split("|")[1].split() == ["0.80", "/", "0.10", "/", "0.00"]
    # the slowest cycle: 3.00 - 1.00 - 0.10
    assert slowest.split("|")[1].split() == ["1.00", "/", "1.90", "/", "0.30"]

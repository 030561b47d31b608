"""An emulated device: the executor's interface (engine/step.py) with no model, for measuring the host's part of
serving on a machine without the accelerator (`PIE_EMULATED_DEVICE_MS=D`: engine/engine.py then starts this in
place of the model's executor).

Each step occupies the "device" for D ms from its submission or from the end of the step before, whichever is
later (steps run one at a time, as on one GPU), and the host is free meanwhile: result() sleeps until the step's
end. So a pipelined control loop (ControlConfig.pipeline, on for every device but "cpu") hides its host work
behind the steps as it would on a GPU, and whatever runs in series with them shows in the wall time: the GPU
machine's host-bound regime, reproduced on a CPU.

`PIE_EMULATED_SUBMIT_MS=H` adds H ms of host work to each submit (a Python spin: it holds the GIL as the real
executor's step building and launches do, ~0.5-1.0 ms a SmolLM2 step on the H100 hosts), so the engine core's
host time per step can be brought near the step's as on the GPU machine, where the SmolLM2 tax comes from.

Tokens are drawn, not computed: a seeded generator picks each sampled token among those the output may take (its
allowed-token mask or ids, else any id below the vocabulary size that is not an eos id), so constrained outputs
take tokens of every length as a model's would. Logprobs are 0.0, where asked (as the sampler gives them).
Nothing checks KV placement beyond what fed tokens need (tests/engine/control/fake_executor.py does that for
the control layer).
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np

from pie_server.engine.config import EngineConfig, EngineInfo, ModelConfig
from pie_server.engine.step import Batch, CommandResult, ForwardCommand, OutputResult, OutputSpec, StepResult

EMULATED_NUM_PAGES = 8192  # without --num-pages: a GPU-sized pool (no memory is allocated for it)
EMULATED_SWAP_SLOTS = 1024


class DeviceClock:
    """One emulated device's timeline: each step occupies it for step_s from its submission or from the end of the
    step before, whichever is later. Callers submit one step at a time."""

    def __init__(self, step_s: float) -> None:
        if step_s < 0:
            raise ValueError("an emulated step takes >= 0 seconds")
        self.step_s = step_s
        self._free_at = 0.0  # time.monotonic() when every step submitted so far has run

    def start_step(self) -> float:
        """Takes the device for a step submitted now; returns when that step ends (time.monotonic())."""
        self._free_at = max(time.monotonic(), self._free_at) + self.step_s
        return self._free_at


class EmulatedStep:
    """A submitted step: its results are known at once and handed out when the emulated device is done."""

    def __init__(self, step_id: int, result: StepResult, ends_at: float) -> None:
        self.step_id, self._result, self._ends_at = step_id, result, ends_at

    def is_ready(self) -> bool:
        return time.monotonic() >= self._ends_at

    def result(self) -> StepResult:
        remaining = self._ends_at - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        return self._result


class EmulatedExecutor:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, step_s: float,
                 eos_token_ids: Sequence[int] = (), seed: int = 0, submit_s: float = 0.0) -> None:
        if submit_s < 0:
            raise ValueError("an emulated submit takes >= 0 seconds")
        self.submit_s = submit_s
        num_pages = engine_config.num_pages or EMULATED_NUM_PAGES
        page_size = engine_config.page_size
        self.info = EngineInfo(num_pages=num_pages, page_size=page_size,
                               max_context_len=min(model_config.max_position_embeddings, num_pages * page_size),
                               kv_bytes_per_page=1)
        self.num_swap_slots = EMULATED_SWAP_SLOTS
        self.vocab_size = model_config.vocab_size
        self._device = DeviceClock(step_s)
        self._plain_ids = np.setdiff1d(np.arange(self.vocab_size), np.asarray(list(eos_token_ids), np.int64))
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # one step at a time
        self._previous: StepResult | None = None  # the last submitted step's (fed tokens)

    @property
    def step_s(self) -> float:
        return self._device.step_s

    def execute(self, batch: Batch) -> StepResult:
        return self.submit(batch).result()

    def forget_previous(self) -> None:
        """No later step may take a token from the steps submitted so far (Executor.forget_previous)."""
        with self._lock:
            self._previous = None

    def submit(self, batch: Batch) -> EmulatedStep:
        with self._lock:
            previous, self._previous = self._previous, None
            results = tuple(self._run(command, previous) for command in batch.forwards)
            result = StepResult(results=results, step_id=batch.step_id)
            self._previous = result
            _spin(self.submit_s)
            return EmulatedStep(batch.step_id, result, self._device.start_step())

    def close(self) -> None:
        pass

    def _run(self, command: ForwardCommand, previous: StepResult | None) -> CommandResult:
        if command.fed_token is not None:
            ref = command.fed_token
            if previous is None or ref.command_index >= len(previous.results) \
                    or ref.output_index >= len(previous.results[ref.command_index].outputs):
                raise ValueError(f"a forward command takes token {ref} of the previous step, which has none")
        return CommandResult(outputs=tuple(self._output(spec) for spec in command.outputs))

    def _output(self, spec: OutputSpec) -> OutputResult:
        if spec.sampling is None:
            token = int(self._rng.choice(self._plain_ids))
            return OutputResult(distribution=((token, 1.0),))
        params = spec.sampling
        if params.allowed_token_mask is not None:
            token = self._allowed_by_mask(params.allowed_token_mask)
        elif params.allowed_token_ids is not None:
            token = int(params.allowed_token_ids[self._rng.integers(len(params.allowed_token_ids))])
        else:
            token = int(self._plain_ids[self._rng.integers(len(self._plain_ids))])
        if params.num_logprobs is None:  # as the sampler: a logprob only where asked
            return OutputResult(token_id=token)
        top = ((token, 0.0),) if params.num_logprobs else ()
        return OutputResult(token_id=token, logprob=0.0, top_logprobs=top)

    def _allowed_by_mask(self, mask: bytes) -> int:
        """A token the mask allows (bit t % 8 of byte t // 8): a random set bit of a random nonzero byte, so the
        emulation's own host time (~10 us a row) stays small next to the host work it is there to show."""
        nonzero = np.flatnonzero(np.frombuffer(mask, np.uint8)[:(self.vocab_size + 7) // 8])
        if not len(nonzero):
            raise ValueError("the mask allows no token")
        byte = int(nonzero[self._rng.integers(len(nonzero))])
        bits = [bit for bit in range(8) if mask[byte] >> bit & 1]  # none at or past the vocabulary (step.py)
        return byte * 8 + bits[self._rng.integers(len(bits))]


def _spin(seconds: float) -> None:
    """Busy host work for `seconds`, holding the GIL (yielding it only at the switch interval) as Python does."""
    if seconds > 0:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

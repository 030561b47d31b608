"""How the control layer schedules: the per-step budget of the batcher and the limits it checks."""
from __future__ import annotations

from dataclasses import dataclass

from pie_server.engine.config import EngineConfig, ModelConfig


DEFAULT_MAX_PAGE_IDS = 1 << 16


@dataclass(frozen=True)
class ControlConfig:
    max_batch_tokens: int = 4096  # new tokens per step (decodes + prefill chunks)
    max_batch_size: int = 256  # forward commands per step
    # A forward with at most this many (remaining) tokens counts as a decode: decodes join a step before
    # prefill chunks do, and are never the ones split to fit the budget unless nothing else is left.
    decode_max_tokens: int = 8
    # Per-instance quota of virtual page ids when open_instance gives none. Every fork or share maps ids of its
    # own without taking a physical page, so this is what bounds forks (and the host memory of a page table)
    # where no quota is set; 65,536 ids is 1M tokens at 16 a page, far past one context. None: unbounded.
    default_max_pages: int | None = DEFAULT_MAX_PAGE_IDS
    # Bounds checked on every forward so one bad command cannot fail a whole batch in the executor.
    # None: taken from the executor's model_config when it has one, else unchecked.
    vocab_size: int | None = None
    max_position: int | None = None  # positions must be < this
    # Gathering (see StepLoop._gather): after a step, wait for the instances whose forwards it resolved to
    # submit their next ones, so one logical batch is not split into alternating halves. The wait ends when
    # all have submitted, when none arrived for gather_idle_s, or at min(gather_max_s, gather_fraction * the
    # step's duration). gather_max_s = 0 turns it off (Pie's plain adaptive policy).
    gather_max_s: float = 0.005
    gather_idle_s: float = 0.001
    gather_fraction: float = 0.5
    # Submit step N + 1 before delivering step N (StepLoop._step_pipelined): the host's work overlaps the
    # device's. Needs an executor with submit(); pays off where the device runs asynchronously (CUDA).
    pipeline: bool = False
    # With pipeline: how many forwards of a decode may be queued ahead of its delivered tokens. 1: step N + 1 is
    # formed and submitted, then step N delivered (the chain deliver N -> form N + 2 -> submit N + 2 must fit in
    # one device step). 2: step N + 2 too, so that chain has two device steps (docs/decisions/pipelined-steps.md);
    # a stop then wastes up to two forwards of the decode instead of one.
    speculation_depth: int = 1
    # A file that gets one JSON line per step (engine/control/step_log.py); None: no log.
    step_log: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "decode_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.speculation_depth not in (1, 2):
            raise ValueError(f"speculation_depth must be 1 or 2, got {self.speculation_depth}")
        if self.gather_max_s < 0 or self.gather_idle_s < 0 or not 0 <= self.gather_fraction <= 1:
            raise ValueError("gather_max_s and gather_idle_s must be >= 0 and gather_fraction in [0, 1]")
        if self.step_log is not None and not self.step_log:
            raise ValueError("step_log must be a path or None")
        for name in ("default_max_pages", "vocab_size", "max_position"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")

    @classmethod
    def for_engine(cls, engine: EngineConfig, model: ModelConfig | None = None,
                   **overrides: int | bool | str | None) -> "ControlConfig":
        """The batch budget of an EngineConfig, the token/position bounds of a ModelConfig, and pipelined
        steps on CUDA (on CPU the executor computes inside submit(): nothing would overlap)."""
        values: dict[str, int | bool | str | None] = dict(
            max_batch_tokens=engine.max_batch_tokens, max_batch_size=engine.max_batch_size,
            pipeline=engine.device != "cpu")
        if model is not None:
            values.update(vocab_size=model.vocab_size, max_position=model.max_position_embeddings)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

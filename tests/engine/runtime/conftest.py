from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import wasmtime

from pie_server.engine.runtime.config import ModelInfo, RuntimeConfig
from pie_server.engine.runtime.runtime import Runtime
from tests.engine.runtime.fakes import ByteTokenizer, FakeControl

WAT_DIR = Path(__file__).parent / "wat"
PAGE_SIZE = 4
MODEL = ModelInfo(name="fake-model", vocab_size=256, page_size=PAGE_SIZE, max_context_len=256,
                  chat_template="{{ messages }}", bos_token_id=1, eos_token_ids=(0,), stop_token_ids=(2,))


def wat(name: str, **substitutions: object) -> bytes:
    text = (WAT_DIR / name).read_text()
    for key, value in substitutions.items():
        text = text.replace(key, str(value))
    return wasmtime.wat2wasm(text)


@pytest.fixture
def control() -> Iterator[FakeControl]:
    fake = FakeControl(num_pages=64, page_size=PAGE_SIZE, vocab_size=MODEL.vocab_size,
                       max_context_len=MODEL.max_context_len)
    yield fake
    fake.stop()


def make_runtime(control: FakeControl, tmp_path: Path, **overrides: object) -> Runtime:
    settings = dict(time_budget_s=20.0, memory_limit_bytes=32 << 20, cache_dir=str(tmp_path / "cache"),
                    log_dir=str(tmp_path / "logs"))
    settings.update(overrides)
    return Runtime(control, ByteTokenizer(), MODEL, RuntimeConfig(**settings))  # type: ignore[arg-type]


@pytest.fixture
def runtime(control: FakeControl, tmp_path: Path) -> Iterator[Runtime]:
    rt = make_runtime(control, tmp_path)
    yield rt
    rt.close()

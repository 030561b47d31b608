"""forward's output requests as the host checks them: a distribution may be as wide as the vocabulary (the
whole distribution), no wider; several outputs may ask about one position."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pie_server.engine.runtime.api_forward import virtual_forward
from pie_server.engine.runtime.hostfn import GuestError
from tests.engine.runtime.conftest import MODEL

HOST: Any = SimpleNamespace(model=MODEL)
SAMPLE = {"temperature": 0.0, "top-k": 0, "top-p": 1.0, "min-p": 0.0, "seed": None, "presence-penalty": 0.0,
          "frequency-penalty": 0.0, "repetition-penalty": 1.0, "prompt-token-ids": [], "output-token-ids": [],
          "logit-bias": [], "allowed-token-ids": None, "num-logprobs": 0}


def _request(*outputs: dict[str, Any]) -> dict[str, Any]:
    return {"token-ids": [5, 6], "positions": [0, 1], "page-ids": [0], "last-page-len": 2, "attention-mask": None,
            "outputs": list(outputs)}


def test_a_distribution_may_span_the_whole_vocabulary() -> None:
    command = virtual_forward(_request({"index": 1, "kind": ("distribution", MODEL.vocab_size)}), HOST)
    assert command.outputs[0].distribution_top_k == MODEL.vocab_size
    with pytest.raises(GuestError, match=f"must be in \\[1, {MODEL.vocab_size}\\]"):
        virtual_forward(_request({"index": 1, "kind": ("distribution", MODEL.vocab_size + 1)}), HOST)
    with pytest.raises(GuestError, match="must be in"):
        virtual_forward(_request({"index": 1, "kind": ("distribution", 0)}), HOST)


def test_several_outputs_may_name_one_position() -> None:
    command = virtual_forward(_request({"index": 1, "kind": ("distribution", 4)},
                                       {"index": 1, "kind": ("sample", SAMPLE)}), HOST)
    assert [o.index for o in command.outputs] == [1, 1]
    assert command.outputs[0].distribution_top_k == 4 and command.outputs[1].sampling is not None

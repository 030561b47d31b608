"""Decodes run to their ends on a Controller stepped by hand (pipelined runs compared with serial ones)."""
from __future__ import annotations

from typing import Any, Sequence

from pie_server.engine.control.config import ControlConfig
from pie_server.engine.control.controller import Controller
from pie_server.engine.control.decoding import DecodeRequest
from pie_server.engine.step import SamplingParams
from pie_server.engine.types import InstanceId


def decode_all(executor: Any, config: ControlConfig, prompts: Sequence[list[int]], max_new: Sequence[int],
               page_size: int) -> list[list[int]]:
    """The greedy tokens of one decode per prompt, all queued before the first step (so every step has the same
    rows however the steps run); each must end by its length."""
    controller = Controller(executor, config)
    streams = []
    for k, (prompt, num_new) in enumerate(zip(prompts, max_new)):
        instance = InstanceId(f"seq-{k}")
        controller.open_instance(instance)
        pages = controller.allocate_pages(instance, -(-(len(prompt) + num_new) // page_size)).result(10)
        streams.append(controller.decode(instance, DecodeRequest(prompt, 0, pages, 0, SamplingParams(), num_new)))
    while controller.step():
        pass
    tokens = []
    for k, stream in enumerate(streams):
        assert stream.done.result(10) == "length"
        tokens.append([output.token_id for output in stream.drain()])
        controller.close_instance(InstanceId(f"seq-{k}"))
    return tokens

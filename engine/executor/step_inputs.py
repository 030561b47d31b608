"""Turns a Batch's forward commands into the step's inputs: token/position tensors, the attention
metadata, and the rows whose logits are wanted. Validates everything before any state changes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from engine.config import ModelConfig
from engine.executor.batch import ForwardCommand, OutputSpec
from kernels.attention import AttentionStep


@dataclass(frozen=True)
class StepInputs:
    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    attention: AttentionStep
    output_rows: list[int]  # [N] rows of the T tokens whose logits are wanted
    output_specs: list[OutputSpec]  # [N]
    num_outputs_per_command: list[int]  # [B]


def build_step_inputs(commands: Sequence[ForwardCommand], model: ModelConfig, page_size: int,
                      num_pages: int) -> StepInputs:
    token_ids: list[int] = []
    positions: list[int] = []
    qo_indptr, kv_page_indptr = [0], [0]
    kv_page_ids: list[int] = []
    last_page_lens: list[int] = []
    slot_ids: list[int] = []
    masks: list = []
    output_rows: list[int] = []
    output_specs: list[OutputSpec] = []
    num_outputs: list[int] = []
    for b, cmd in enumerate(commands):
        context_len = _validate(b, cmd, model, page_size, num_pages)
        first_row = len(token_ids)
        token_ids.extend(cmd.token_ids)
        positions.extend(cmd.positions)
        qo_indptr.append(len(token_ids))
        kv_page_ids.extend(cmd.page_ids)
        kv_page_indptr.append(len(kv_page_ids))
        last_page_lens.append(cmd.last_page_len)
        for slot in range(context_len - len(cmd.token_ids), context_len):
            slot_ids.append(cmd.page_ids[slot // page_size] * page_size + slot % page_size)
        masks.append(cmd.attention_mask)
        output_rows.extend(first_row + o.index for o in cmd.outputs)
        output_specs.extend(cmd.outputs)
        num_outputs.append(len(cmd.outputs))
    if len(set(slot_ids)) != len(slot_ids):
        raise ValueError("two forward commands in one batch write the same KV slot")
    step = AttentionStep(page_size=page_size, qo_indptr=qo_indptr, kv_page_indptr=kv_page_indptr,
                         kv_page_ids=kv_page_ids, kv_last_page_lens=last_page_lens, slot_ids=slot_ids,
                         custom_masks=masks if any(m is not None for m in masks) else None)
    return StepInputs(token_ids, positions, step, output_rows, output_specs, num_outputs)


def _validate(b: int, cmd: ForwardCommand, model: ModelConfig, page_size: int, num_pages: int) -> int:
    """Checks command b; returns its context length."""
    num_tokens = len(cmd.token_ids)
    where = f"forward command {b}"
    if num_tokens == 0 or len(cmd.positions) != num_tokens:
        raise ValueError(f"{where}: needs >= 1 token and one position per token")
    if not cmd.page_ids or not 1 <= cmd.last_page_len <= page_size:
        raise ValueError(f"{where}: needs pages and 1 <= last_page_len <= {page_size}")
    if len(set(cmd.page_ids)) != len(cmd.page_ids):
        raise ValueError(f"{where}: duplicate page ids")
    if min(cmd.page_ids) < 0 or max(cmd.page_ids) >= num_pages:
        raise ValueError(f"{where}: page id out of range [0, {num_pages})")
    if min(cmd.token_ids) < 0 or max(cmd.token_ids) >= model.vocab_size:
        raise ValueError(f"{where}: token id out of range [0, {model.vocab_size})")
    if min(cmd.positions) < 0 or max(cmd.positions) >= model.max_position_embeddings:
        raise ValueError(f"{where}: position out of range [0, {model.max_position_embeddings})")
    context_len = cmd.context_len(page_size)
    if context_len < num_tokens:
        raise ValueError(f"{where}: {num_tokens} tokens do not fit a context of {context_len} slots")
    for o in cmd.outputs:
        if not 0 <= o.index < num_tokens:
            raise ValueError(f"{where}: output index {o.index} out of range [0, {num_tokens})")
    if cmd.attention_mask is not None:
        if len(cmd.attention_mask) != num_tokens or any(len(r) != context_len for r in cmd.attention_mask):
            raise ValueError(f"{where}: attention mask must be [{num_tokens}][{context_len}]")
        if not all(any(r) for r in cmd.attention_mask):
            raise ValueError(f"{where}: every attention mask row must allow at least one slot")
    return context_len

"""The executor: runs one Batch (swaps, page copies, one forward over all commands, sampling) per call.

No HTTP, Wasm or scheduling here: it can be driven directly by tests and benchmarks.
"""
from __future__ import annotations

import time
from types import ModuleType
from typing import MutableMapping

import torch

from engine.config import EngineConfig, EngineInfo, ModelConfig
from engine.executor.batch import Batch, CommandResult, OutputResult, StepResult
from engine.executor.kv_pool import KVPool, kv_bytes_per_page, plan_num_pages
from engine.executor.sampler import Sampler
from engine.executor.step_inputs import StepInputs, build_step_inputs
from engine.model.llama import LlamaModel
from kernels.attention import AttentionBackend, TorchAttention

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Executor:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig,
                 weights: MutableMapping[str, torch.Tensor] | None = None,
                 attention: AttentionBackend | None = None, ops: ModuleType | None = None) -> None:
        self.model_config, self.engine_config = model_config, engine_config
        self.device = torch.device(engine_config.device)
        self.dtype = _DTYPES[engine_config.resolved_dtype]
        kernel_ops, default_attention = _kernels_for(self.device)
        ops = ops or kernel_ops
        if weights is None:
            self.model = LlamaModel.random(model_config, self.device, self.dtype, engine_config.seed, ops)
        else:
            self.model = LlamaModel(model_config, weights, self.device, self.dtype, ops)
            weights.clear()  # consumed: the unfused copies must be gone before the KV pool is sized
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.attention = attention or default_attention
        num_pages = plan_num_pages(model_config, engine_config, self.dtype, self.device)
        self.kv = KVPool(model_config, num_pages, engine_config.page_size, self.dtype, self.device)
        self.sampler = Sampler(seed=engine_config.seed)
        self.decode_graphs = _decode_graphs(self.model, self.kv, self.attention, engine_config)
        self.info = EngineInfo(
            num_pages=num_pages, page_size=engine_config.page_size,
            max_context_len=min(model_config.max_position_embeddings, num_pages * engine_config.page_size),
            kv_bytes_per_page=kv_bytes_per_page(model_config, engine_config.page_size, self.dtype))

    @property
    def num_swap_slots(self) -> int:
        return self.kv.num_swap_slots

    def execute(self, batch: Batch) -> StepResult:
        """Validates the whole batch first: an invalid batch raises ValueError and changes nothing."""
        started = time.perf_counter()
        inputs = build_step_inputs(batch.forwards, self.model_config, self.kv.page_size, self.kv.num_pages) \
            if batch.forwards else None
        for swap in (*batch.swap_outs, *batch.swap_ins):
            self.kv.check_swap(swap)
        for copy in batch.page_copies:
            self.kv.check_copy(copy)
        self.kv.swap_out(list(batch.swap_outs))
        self.kv.swap_in(list(batch.swap_ins))
        self.kv.copy(list(batch.page_copies))
        results = self._forward(inputs) if inputs is not None else ()
        return StepResult(results=results, step_id=batch.step_id, elapsed_s=time.perf_counter() - started)

    def _forward(self, inputs: StepInputs) -> tuple[CommandResult, ...]:
        logits = self._logits(inputs)
        outputs = self.sampler.sample(logits, inputs.output_specs) if len(inputs.output_rows) else []
        return _split(outputs, inputs.num_outputs_per_command)

    def logits(self, batch: Batch) -> torch.Tensor:
        """Runs the batch's forwards and returns the raw logits [N, V] of the requested rows (no sampling)."""
        return self._logits(build_step_inputs(batch.forwards, self.model_config, self.kv.page_size,
                                              self.kv.num_pages))

    def _logits(self, inputs: StepInputs) -> torch.Tensor:
        graphs = self.decode_graphs
        if graphs is not None and graphs.supports(inputs.attention):
            hidden = graphs.forward(inputs.token_ids, inputs.positions, inputs.attention)
        else:
            self.attention.plan(inputs.attention)
            input_ids = torch.from_numpy(inputs.token_ids).to(self.device, non_blocking=True)
            positions = torch.from_numpy(inputs.positions).to(self.device, non_blocking=True)
            hidden = self.model.forward(input_ids, positions, self.attention, self.kv.layers)
        rows = torch.from_numpy(inputs.output_rows).to(self.device, non_blocking=True)
        return self.model.logits(hidden.index_select(0, rows))


def _split(outputs: list[OutputResult], counts: list[int]) -> tuple[CommandResult, ...]:
    results, start = [], 0
    for n in counts:
        results.append(CommandResult(outputs=tuple(outputs[start:start + n])))
        start += n
    return tuple(results)


def _decode_graphs(model: LlamaModel, kv: KVPool, attention: AttentionBackend, engine: EngineConfig):
    """CUDA-graph decode (engine/executor/cuda_graphs.py) when on CUDA with FlashInfer and enabled."""
    if model.device.type != "cuda" or not engine.cuda_graphs or type(attention).__name__ != "FlashInferAttention":
        return None
    from engine.executor.cuda_graphs import build_decode_graphs
    return build_decode_graphs(model, kv.layers, kv.page_size, engine.max_batch_size)


def _kernels_for(device: torch.device) -> tuple[ModuleType, AttentionBackend]:
    """Torch reference kernels on CPU; FlashInfer (when installed) on CUDA."""
    import kernels.ops as torch_ops
    if device.type != "cuda":
        return torch_ops, TorchAttention(device)
    try:
        import kernels.gpu_ops as gpu_ops
        from kernels.flashinfer_attention import FlashInferAttention
        return gpu_ops, FlashInferAttention(device)
    except ImportError:
        return torch_ops, TorchAttention(device)

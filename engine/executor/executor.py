"""The executor: runs one Batch (swaps, page copies, one forward over all commands, sampling) per call.

execute() runs a step to the end; submit() only enqueues it, so the caller can build the next step while
the device works, and that step can take this one's sampled tokens on the device (batch.TokenRef).

No HTTP, Wasm or scheduling here: it can be driven directly by tests and benchmarks.

Tensor-parallel (`parallel` set): every rank builds an Executor over its shard and runs the same start-up (the
memory probes and graph captures hold collectives); then rank 0 is the executor the control layer drives, and
sends each validated step to the other ranks (`worker_ranks`, engine/executor/tensor_parallel.py), which run
the same forward. Only rank 0 samples.
"""
from __future__ import annotations

import logging
import os
import time
from types import ModuleType
from typing import TYPE_CHECKING, MutableMapping

import numpy as np
import torch

from pie_server.engine.config import EngineConfig, EngineInfo, ModelConfig
from pie_server.engine.step import Batch, StepResult
from pie_server.engine.executor.kv_pool import KVPool, kv_bytes_per_page, plan_num_pages, plan_num_swap_slots
from pie_server.engine.executor.memory import MemoryPlan, decode_probe, pieces_probe, prefill_probe, probe_num_pages
from pie_server.engine.executor.pending import PendingStep, StepOutputs
from pie_server.engine.executor.piecewise_graphs import PiecewiseConfig, PiecewiseGraphs
from pie_server.engine.executor.sampler import SampledOutputs, Sampler, all_plain_greedy, greedy_outputs
from pie_server.engine.executor.step_inputs import PageArrays, StepInputs, build_step_inputs
from pie_server.engine.model.llama import LlamaModel
from pie_server.engine.model.loader import cache_root
from pie_server.engine.model.parallel import TensorParallel
from pie_server.kernels.attention import AttentionBackend, TorchAttention
from pie_server.kernels.cpu_linear import RECORD_NAME, CpuLinear
from pie_server.kernels.flashinfer_attention import WORKSPACE_BYTES
from pie_server.kernels.transfer import to_device

if TYPE_CHECKING:
    from pie_server.engine.executor.cuda_graphs import CudaGraphDecoder
    from pie_server.engine.executor.tensor_parallel import WorkerRanks

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Executor:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig,
                 weights: MutableMapping[str, torch.Tensor] | None = None,
                 attention: AttentionBackend | None = None, ops: ModuleType | None = None,
                 parallel: TensorParallel | None = None) -> None:
        """weights: HF-named (this rank's shard when `parallel` is set); None: random weights."""
        self.model_config, self.engine_config = model_config, engine_config
        self.parallel = parallel
        self.worker_ranks: WorkerRanks | None = None  # rank 0, once the other ranks wait for steps
        self.device = torch.device(engine_config.device)
        self.dtype = _DTYPES[engine_config.resolved_dtype]
        kernel_ops, default_attention = _kernels_for(self.device)
        ops = ops or kernel_ops
        if weights is None:
            self.model = LlamaModel.random(model_config, self.device, self.dtype, engine_config.seed, ops, parallel)
        else:
            self.model = LlamaModel(model_config, weights, self.device, self.dtype, ops, parallel)
            weights.clear()  # consumed: the unfused copies must be gone before the KV pool is sized
        if self.device.type == "cpu" and self.dtype == torch.float32 and parallel is None and ops is kernel_ops:
            # kernels/cpu_linear.py: the ways recorded for this machine, or measured once and recorded
            self.model.linear = CpuLinear.measured(self.model.matmul_weights(), record=cache_root() / RECORD_NAME)
        local_config = self.model.config  # this rank's heads (all of them without tensor parallelism)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.attention = attention or default_attention
        self.sampler = Sampler(seed=engine_config.seed)
        self._previous: StepOutputs | None = None  # the last launched step's tokens (see pending.py)
        self._page_arrays = PageArrays()  # decode steps' page lists, converted once (step_inputs.py)
        self.memory_plan: MemoryPlan | None = None
        self.decode_graphs = None  # captured once the pool exists
        self.piecewise_graphs = None  # likewise
        if engine_config.num_pages is None and self.device.type == "cuda":
            self.memory_plan = self._plan_memory()
            num_pages = self.memory_plan.num_pages(kv_bytes_per_page(local_config, engine_config.page_size,
                                                                     self.dtype))
        else:
            num_pages = plan_num_pages(local_config, engine_config, self.dtype, engine_config.tensor_parallel_size)
        if parallel is not None:  # every rank's pool must hold the same pages
            num_pages = parallel.agree_min(num_pages, self.device)
        page_bytes = kv_bytes_per_page(local_config, engine_config.page_size, self.dtype)
        num_swap_slots = plan_num_swap_slots(num_pages, page_bytes, engine_config.swap_space_gib)
        self.kv = KVPool(local_config, num_pages, engine_config.page_size, self.dtype, self.device, num_swap_slots)
        self.decode_graphs = _decode_graphs(self.model, self.kv, self.attention, engine_config)
        self.piecewise_graphs = _piecewise_graphs(self.model, self.kv, self.attention, engine_config)
        if self.device.type == "cuda":  # JIT-compile the one-row LM head kernel now, not on a first request
            self.model.logits(torch.zeros(1, model_config.hidden_size, device=self.device, dtype=self.dtype))
        self.info = EngineInfo(
            num_pages=num_pages, page_size=engine_config.page_size,
            max_context_len=min(model_config.max_position_embeddings, num_pages * engine_config.page_size),
            kv_bytes_per_page=kv_bytes_per_page(model_config, engine_config.page_size, self.dtype))

    def _plan_memory(self) -> MemoryPlan:
        """Runs the largest prefill and decode steps on a probe pool (see memory.py), then frees it."""
        cfg = self.engine_config
        self.kv = KVPool(self.model.config, probe_num_pages(cfg), cfg.page_size, self.dtype, self.device,
                         num_swap_slots=1)
        activation_bytes = self._peak_bytes(prefill_probe(self.model_config, cfg))
        graph_bytes = self._peak_bytes(decode_probe(cfg)) + WORKSPACE_BYTES if cfg.cuda_graphs else 0
        pieces = _piecewise_config(self.model, self.attention, cfg)
        if pieces is not None:  # their pool: one step of the largest bucket
            graph_bytes += self._peak_bytes(pieces_probe(self.model_config, cfg, pieces.max_tokens))
        del self.kv
        self._previous = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        plan = MemoryPlan(total_bytes=total, in_use_bytes=total - free, activation_bytes=activation_bytes,
                          graph_bytes=graph_bytes, utilization=cfg.gpu_memory_utilization)
        log.info("GPU memory: %s (PyTorch: %.2f GiB allocated, %.2f GiB reserved)", plan.describe(),
                 torch.cuda.memory_allocated(self.device) / 2**30, torch.cuda.memory_reserved(self.device) / 2**30)
        return plan

    def _peak_bytes(self, commands: list) -> int:
        """Peak device memory a step over `commands` allocates beyond what exists before it."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute(Batch(forwards=commands))
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before

    @property
    def num_swap_slots(self) -> int:
        return self.kv.num_swap_slots

    def execute(self, batch: Batch) -> StepResult:
        """Runs one step to completion (submit, then wait for its results)."""
        return self.submit(batch).result()

    def submit(self, batch: Batch) -> PendingStep:
        """Validates the whole batch first (an invalid batch raises ValueError and changes nothing), then
        enqueues its work on the device without waiting for it: the host may build the next step meanwhile."""
        started = time.perf_counter()
        inputs = build_step_inputs(batch.forwards, self.model_config, self.kv.page_size, self.kv.num_pages,
                                   self._page_arrays) if batch.forwards else None
        feed = self._feed_rows(inputs)
        for swap in (*batch.swap_outs, *batch.swap_ins):
            self.kv.check_swap(swap)
        for copy in batch.page_copies:
            self.kv.check_copy(copy)
        previous, self._previous = self._previous, None  # a step that fails midway cannot be referenced
        if self.worker_ranks is not None:
            self.worker_ranks.send_step(batch, inputs)
        self.kv.swap_out(list(batch.swap_outs))
        self.kv.swap_in(list(batch.swap_ins))
        self.kv.copy(list(batch.page_copies))
        if inputs is None:
            return PendingStep(batch.step_id, None, [], started)
        sampled = self._launch(inputs, feed, previous)
        if sampled is not None:
            self._previous = StepOutputs.of(sampled, inputs.num_outputs_per_command)
        return PendingStep(batch.step_id, sampled, inputs.num_outputs_per_command, started)

    def logits(self, batch: Batch) -> torch.Tensor | None:
        """Runs the batch's forwards and returns the raw logits [N, V] of the requested rows (no sampling).
        Only its forwards: swaps and page copies are not applied. None on tensor-parallel ranks other than 0."""
        inputs = build_step_inputs(batch.forwards, self.model_config, self.kv.page_size, self.kv.num_pages,
                                   self._page_arrays)
        feed = self._feed_rows(inputs)
        previous, self._previous = self._previous, None
        if self.worker_ranks is not None:
            self.worker_ranks.send_step(Batch(forwards=batch.forwards), inputs)
        return self._logits(inputs, feed, previous)

    def forget_previous(self) -> None:
        """No later step may take a token from the steps launched so far (one submitted after them failed where
        this executor did not see it: engine/executor/remote.py)."""
        self._previous = None

    def close(self) -> None:
        """Stops the other tensor-parallel ranks (if any); nothing else is released."""
        if self.worker_ranks is not None:
            self.worker_ranks.close()
            self.worker_ranks = None

    def _feed_rows(self, inputs: StepInputs | None) -> np.ndarray | None:
        """[F] rows of the previous step's tokens that this step's fed tokens take; ValueError if invalid."""
        if inputs is None or not inputs.fed_refs:
            return None
        if self._previous is None:
            raise ValueError("a forward command takes a token of the previous step, which sampled none")
        return self._previous.rows_of(inputs.fed_refs)

    def _launch(self, inputs: StepInputs, feed: np.ndarray | None,
                previous: StepOutputs | None) -> SampledOutputs | None:
        """The step's forward and its sampling, enqueued; None when it has no output rows, or on a
        tensor-parallel rank other than 0 (its start-up probes: only rank 0 samples)."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.config.head and len(inputs.output_rows) and graphs.supports(inputs.attention):
            return self._launch_in_graph(graphs, inputs, feed, previous)
        logits = self._logits(inputs, feed, previous)
        return self.sampler.launch(logits, inputs.output_specs) \
            if len(inputs.output_rows) and logits is not None else None

    def _launch_in_graph(self, graphs: "CudaGraphDecoder", inputs: StepInputs, feed: np.ndarray | None,
                         previous: StepOutputs | None) -> SampledOutputs:
        """A decode step on graphs with the head (cuda_graphs.py): tokens fed from the last replay are taken
        inside this one, and when every row is one plain greedy output, the graph's argmax is the answer."""
        feed_src, fed = None, None
        if feed is not None:
            assert previous is not None
            if graphs.holds(previous.tokens):
                feed_src = np.full(len(inputs.token_ids), -1, np.int64)
                feed_src[inputs.fed_rows] = feed
            else:
                fed = self._fed_tokens(inputs, feed, previous)
        out = graphs.forward(inputs.token_ids, inputs.positions, inputs.attention, fed, feed_src)
        assert out.logits is not None and out.tokens is not None
        rows, specs = inputs.output_rows, inputs.output_specs
        every_row = len(rows) == len(inputs.token_ids) and bool((rows == np.arange(len(rows))).all())
        if every_row and all_plain_greedy(specs):
            return greedy_outputs(out.tokens)
        logits = out.logits if every_row else out.logits.index_select(0, to_device(rows, self.device))
        return self.sampler.launch(logits, specs)

    def _logits(self, inputs: StepInputs, feed: np.ndarray | None,
                previous: StepOutputs | None) -> torch.Tensor | None:
        fed = None
        if feed is not None:
            assert previous is not None
            fed = self._fed_tokens(inputs, feed, previous)
        return self.forward_logits(inputs, fed)

    def _fed_tokens(self, inputs: StepInputs, feed: np.ndarray,
                    previous: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """([F] token rows, [F] token ids) on the device: the previous step's tokens that this step's fed rows
        take."""
        index = to_device(np.concatenate([inputs.fed_rows, feed]), self.device)
        rows, sources = index.split(len(feed))
        fed = (rows, previous.tokens.index_select(0, sources))
        if self.parallel is not None:  # the other ranks take the tokens from rank 0 (tensor_parallel.py)
            self.parallel.broadcast(fed[1])
        return fed

    def forward_logits(self, inputs: StepInputs,
                       fed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """The step's forward and the logits of its output rows; fed: ([F] rows, [F] token ids) on the device,
        the tokens that replace those rows' ids. None on tensor-parallel ranks other than 0."""
        graphs, pieces = self.decode_graphs, self.piecewise_graphs
        if graphs is not None and graphs.supports(inputs.attention):
            out = graphs.forward(inputs.token_ids, inputs.positions, inputs.attention, fed)
            if out.logits is not None:  # computed in the graph (a view the next replay overwrites)
                return out.logits.index_select(0, to_device(inputs.output_rows, self.device))
            hidden = out.hidden
        elif pieces is not None and pieces.supports(inputs.attention):
            hidden = pieces.forward(inputs.token_ids, inputs.positions, inputs.attention, self.attention, fed)
        else:
            self.attention.plan(inputs.attention)
            input_ids = to_device(inputs.token_ids, self.device)
            if fed is not None:
                input_ids.index_copy_(0, *fed)
            positions = to_device(inputs.positions, self.device)
            hidden = self.model.forward(input_ids, positions, self.attention, self.kv.layers)
        rows = to_device(inputs.output_rows, self.device)
        return self.model.logits(hidden.index_select(0, rows))


def _decode_graphs(model: LlamaModel, kv: KVPool, attention: AttentionBackend, engine: EngineConfig):
    """CUDA-graph decode (engine/executor/cuda_graphs.py) when on CUDA with FlashInfer and enabled."""
    if model.device.type != "cuda" or not engine.cuda_graphs or not attention.supports_cuda_graphs:
        return None
    from pie_server.engine.executor.cuda_graphs import build_decode_graphs
    # The LM head inside the graphs: not under tensor parallelism (its logits gather across ranks);
    # PIE_GRAPH_HEAD=0 leaves it out (A/B benchmarks).
    head = model.parallel is None and os.environ.get("PIE_GRAPH_HEAD", "1") != "0"
    return build_decode_graphs(model, kv.layers, kv.page_size, engine.max_batch_size, engine.fused_decode, head)


def _piecewise_config(model: LlamaModel, attention: AttentionBackend, engine: EngineConfig) -> PiecewiseConfig | None:
    """Piecewise graphs on CUDA with FlashInfer, graphs and them enabled; not yet under tensor parallelism
    (every rank would have to capture and replay the same pieces). None: eager steps."""
    if model.device.type == "cuda" and engine.cuda_graphs and engine.piecewise_graphs and \
            attention.supports_cuda_graphs and model.parallel is None:
        return PiecewiseConfig.for_step_budget(engine.max_batch_tokens, engine.piecewise_max_tokens)
    return None


def _piecewise_graphs(model: LlamaModel, kv: KVPool, attention: AttentionBackend,
                      engine: EngineConfig) -> PiecewiseGraphs | None:
    config = _piecewise_config(model, attention, engine)
    return None if config is None else PiecewiseGraphs.for_model(model, kv.layers, config)


def _kernels_for(device: torch.device) -> tuple[ModuleType, AttentionBackend]:
    """Torch reference kernels on CPU; FlashInfer (when installed) on CUDA."""
    import pie_server.kernels.ops as torch_ops
    if device.type != "cuda":
        return torch_ops, TorchAttention(device)
    try:
        import pie_server.kernels.gpu_ops as gpu_ops
        from pie_server.kernels.flashinfer_attention import FlashInferAttention
        return gpu_ops, FlashInferAttention(device)
    except ImportError:
        return torch_ops, TorchAttention(device)

"""A Llama-family decoder (Llama 2/3/3.1, SmolLM2, Qwen2 with qkv bias) in plain PyTorch over a paged KV cache.

Weights use Hugging Face names on load and are fused here: qkv_proj = [q; k; v], gate_up_proj = [gate; up].
Shapes: T tokens in the step, H hidden, Hq/Hkv heads, D head_dim.

Tensor-parallel (engine/model/parallel.py): a rank is given its shard of the weights (the loader reads only
that) and runs the same code on its own heads and MLP width; `config` is then the rank's local shape, the
o and down projections end in an all-reduce, and logits() gathers the vocabulary-split LM head's rows on rank 0.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

import pie_server.kernels.ops as torch_ops
from pie_server.engine.config import ModelConfig
from pie_server.engine.model.parallel import Shard, TensorParallel
from pie_server.kernels.attention import AttentionBackend
from pie_server.kernels.kv_append import append_kv


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv_proj: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [H, Hq D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_proj: torch.Tensor  # [2 I, H]
    gate_up_bias: torch.Tensor | None
    down_proj: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, ops: ModuleType = torch_ops, parallel: TensorParallel | None = None) -> None:
        """weights: HF-named, this rank's shard of each (loader.load_weights(shard=...)) when parallel is set."""
        self.parallel = parallel
        self.config = local = parallel.shard.local_config(config) if parallel is not None else config
        self.device = device
        self.dtype = dtype
        self.ops = ops
        # The matmul of the projections and the LM head (outside one-row kernels): ops.linear, or on CPU the
        # ways measured on the machine (kernels/cpu_linear.py; the executor sets it).
        self.linear: Callable[..., torch.Tensor] = ops.linear
        w = _Weights(weights, device, dtype)
        self.embed_tokens = w.take("model.embed_tokens.weight")
        self.layers = [_layer(w, local, i) for i in range(local.num_layers)]
        self.norm = w.take("model.norm.weight")
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else w.take("lm_head.weight")
        if parallel is not None and config.tie_word_embeddings:  # the rank's rows of the replicated embedding
            self.lm_head = parallel.shard.vocab_part(self.embed_tokens, config.vocab_size)
        self.cos_sin_cache = ops.rope_cos_sin_cache(local.rope, local.head_dim, local.max_position_embeddings,
                                                    device)
        self._q_size = local.num_heads * local.head_dim
        self._kv_size = local.num_kv_heads * local.head_dim
        # While True (graph_mode()), one-row matmuls go to ops.single_row_linear (a GEMV kernel on CUDA whose
        # Python launch cost only pays off when a CUDA graph replays it) and a one-token forward to
        # _forward_one_row (fused GEMVs).
        self._single_row_kernels = False
        self._fuse_one_row = False

    @classmethod
    def random(cls, config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
               ops: ModuleType = torch_ops, parallel: TensorParallel | None = None) -> "LlamaModel":
        """Random weights of the right shapes (speed does not depend on values); with `parallel`, of the rank's
        shard shapes (every rank draws the same numbers: the replicated embedding is the same everywhere)."""
        shard = parallel.shard if parallel is not None else None
        return cls(config, random_weights(config, device, dtype, seed, shard), device, dtype, ops, parallel)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions [T] int64 -> final hidden states [T, H] (attention already planned)."""
        if self._fuse_one_row and input_ids.shape[0] == 1:
            return self._forward_one_row(input_ids, positions, attention, kv_caches)
        hidden, residual = self.embed(input_ids), None
        for index, kv_cache in enumerate(kv_caches):
            qkv, residual = self.before_attention(index, hidden, residual)
            attended = self.attend(qkv, positions, attention, kv_cache)
            hidden, residual = self.after_attention(index, attended, residual)
        return self.final_norm(hidden, residual)

    # The pieces of forward() (engine/executor/piecewise_graphs.py replays all but attend() from CUDA graphs).
    # Invariant: each piece only maps rows to rows (row t of every output depends on row t of the inputs
    # alone), so padding rows never change real ones.

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> hidden [T, H]."""
        return F.embedding(input_ids, self.embed_tokens)

    def before_attention(self, index: int, hidden: torch.Tensor,
                         residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s input norm and qkv projection: (qkv [T, (Hq + 2 Hkv) D], residual [T, H]).
        residual None: the first layer (hidden is the embedding). GPU ops update hidden/residual in place."""
        layer, eps = self.layers[index], self.config.rms_norm_eps
        if residual is None:
            residual, x = hidden, self.ops.rms_norm(hidden, layer.input_norm, eps)
        else:
            x, residual = self.ops.add_rms_norm(hidden, residual, layer.input_norm, eps)
        return self._linear(x, layer.qkv_proj, layer.qkv_bias), residual

    def rope_and_write_kv(self, qkv: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                          write_index: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor:
        """What piecewise graphs do before attend(): RoPE on q and k at positions [N], and row t's K/V (that of
        row source_rows[t]) written to kv_cache at write_index [2N] (pages, then offsets: append_kv's layout).
        qkv [N, (Hq + 2 Hkv) D] -> q [N, Hq, D] (rotated; a view of qkv where the ops rotate in place)."""
        q, k, v = self._heads(qkv)
        q, k = self.ops.apply_rope(q, k, positions, self.cos_sin_cache)
        append_kv(kv_cache, k, v, write_index, source_rows)
        return q

    def after_attention(self, index: int, attended: torch.Tensor,
                        residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s o projection and MLP: attended [T, Hq D] -> (hidden [T, H], residual [T, H])."""
        layer, ops = self.layers[index], self.ops
        hidden = self._row_parallel_linear(attended, layer.o_proj, layer.o_bias)
        x, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, self.config.rms_norm_eps)
        gate_up = self._linear(x, layer.gate_up_proj, layer.gate_up_bias)
        return self._row_parallel_linear(ops.silu_and_mul(gate_up), layer.down_proj, layer.down_bias), residual

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> final hidden states [T, H]."""
        out, _ = self.ops.add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)
        return out

    def _forward_one_row(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                         kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """forward() of one token in graph mode: the norms, SiLU and residual adds ride in the matmuls
        (ops.rms_norm_linear, ops.rms_norm_gated_linear, ops.linear_add_: fused GEMVs on CUDA), and RoPE with
        the KV append too where the attention backend lets the model write K/V (kv_write_index()). The
        residual stream [1, H] is updated in place by the o and down projections."""
        cfg, ops, eps = self.config, self.ops, self.config.rms_norm_eps
        residual = F.embedding(input_ids, self.embed_tokens)
        write_index = attention.kv_write_index()  # not None: the qkv projection writes K/V itself
        for layer, kv_cache in zip(self.layers, kv_caches):
            if write_index is None:
                qkv = ops.rms_norm_linear(residual, layer.input_norm, eps, layer.qkv_proj, layer.qkv_bias)
                out = self.attend(qkv, positions, attention, kv_cache)
            else:
                q = ops.rms_norm_qkv_rope_append(residual, layer.input_norm, eps, layer.qkv_proj, layer.qkv_bias,
                                                 positions, self.cos_sin_cache, kv_cache, write_index,
                                                 cfg.num_heads, cfg.num_kv_heads)
                out = attention.attend(q, kv_cache).reshape(1, self._q_size)
            ops.linear_add_(out, layer.o_proj, layer.o_bias, residual)
            act = ops.rms_norm_gated_linear(residual, layer.post_norm, eps, layer.gate_up_proj, layer.gate_up_bias)
            ops.linear_add_(act, layer.down_proj, layer.down_bias, residual)
        return ops.rms_norm(residual, self.norm, cfg.rms_norm_eps)

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
               kv_cache: torch.Tensor) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D] -> attention output [T, Hq D] (RoPE, K/V appended to kv_cache)."""
        q, k, v = self._heads(qkv)
        out = attention.rope_and_forward(q, k, v, positions, self.cos_sin_cache, kv_cache, self.ops.apply_rope)
        return out.reshape(qkv.shape[0], self._q_size)

    def matmul_weights(self) -> list[torch.Tensor]:
        """The weights of every step's matmuls: each layer's qkv, o, gate_up and down projections, the LM head."""
        return [w for layer in self.layers for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                                     layer.down_proj)] + [self.lm_head]

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, (Hq + 2 Hkv) D] -> views q [T, Hq, D], k and v [T, Hkv, D]."""
        cfg, num_tokens = self.config, qkv.shape[0]
        q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
        kv_shape = (num_tokens, cfg.num_kv_heads, cfg.head_dim)
        return q.reshape(num_tokens, cfg.num_heads, cfg.head_dim), k.reshape(kv_shape), v.reshape(kv_shape)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._single_row_kernels and x.shape[0] == 1:
            return self.ops.single_row_linear(x, weight, bias)
        return self.linear(x, weight, bias)

    def _row_parallel_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """o and down projections: each rank's product over its input columns is a partial sum; the all-reduce
        completes it on every rank, then the bias (replicated) is added once."""
        if self.parallel is None:
            return self._linear(x, weight, bias)
        out = self.parallel.all_reduce(self._linear(x, weight, None))
        return out if bias is None else out + bias

    @contextmanager
    def graph_mode(self, fuse_one_row: bool = True) -> Iterator[None]:
        """For CUDA-graph warm-up and capture: one-row matmuls use ops.single_row_linear and, if fuse_one_row,
        a one-token forward runs _forward_one_row."""
        previous = self._single_row_kernels, self._fuse_one_row
        # The fused one-row forward adds the o and down products into the residual inside the GEMV, before any
        # all-reduce could complete them: tensor-parallel ranks run the unfused forward.
        self._single_row_kernels, self._fuse_one_row = True, fuse_one_row and self.parallel is None
        try:
            yield
        finally:
            self._single_row_kernels, self._fuse_one_row = previous

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """[N, H] -> [N, V] float32 (written into out [N, V] float32 when given: a graph's static buffer). One
        row (decode at batch 1) reads the whole LM head for one token: the GEMV kernel of
        ops.single_row_linear, worth its launch cost there. Tensor-parallel: each rank computes its rows of the
        vocabulary and rank 0 gathers them (the others get None); N is the same on every rank."""
        if hidden.shape[0] == 1 and self.device.type == "cuda":
            local = self.ops.single_row_linear(hidden, self.lm_head)
        else:
            local = self.linear(hidden, self.lm_head)
        if out is not None and self.parallel is None:
            return out.copy_(local)
        if self.parallel is None:
            return local.float()
        if hidden.shape[0] == 0:  # nothing to gather (a step without sampled rows)
            return local.new_empty(0, self.config.vocab_size, dtype=torch.float32)
        gathered = self.parallel.gather_vocab(local, self.config.vocab_size)
        return None if gathered is None else gathered.float()


class _Weights:
    """Takes HF-named tensors, checking presence, moving to device/dtype once. A mutable mapping gives each
    tensor up as it is taken: a piece of a fused matrix (q, k, v; gate, up) is freed right after the
    concatenation, so device memory never holds both copies of the model's projections (a peak, and holes
    in the allocator's segments that later count against the KV pool)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self._weights = weights
        self._device, self._dtype = device, dtype

    def take(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            raise KeyError(f"missing weight {name!r}")
        tensor = self._weights.pop(name) if isinstance(self._weights, MutableMapping) else self._weights[name]
        return tensor.to(device=self._device, dtype=self._dtype)

    def maybe(self, name: str, wanted: bool) -> torch.Tensor | None:
        return self.take(name) if wanted else None

    def cat(self, names: list[str]) -> torch.Tensor:
        return torch.cat([self.take(n) for n in names], dim=0)


def _layer(w: _Weights, cfg: ModelConfig, i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    attn = [p + f"self_attn.{x}_proj" for x in ("q", "k", "v")]
    mlp = [p + f"mlp.{x}_proj" for x in ("gate", "up")]
    return LayerWeights(
        input_norm=w.take(p + "input_layernorm.weight"),
        qkv_proj=w.cat([n + ".weight" for n in attn]),
        qkv_bias=w.cat([n + ".bias" for n in attn]) if cfg.qkv_bias else None,
        o_proj=w.take(p + "self_attn.o_proj.weight"),
        o_bias=w.maybe(p + "self_attn.o_proj.bias", cfg.o_bias),
        post_norm=w.take(p + "post_attention_layernorm.weight"),
        gate_up_proj=w.cat([n + ".weight" for n in mlp]),
        gate_up_bias=w.cat([n + ".bias" for n in mlp]) if cfg.mlp_bias else None,
        down_proj=w.take(p + "mlp.down_proj.weight"),
        down_bias=w.maybe(p + "mlp.down_proj.bias", cfg.mlp_bias),
    )


def weight_shapes(cfg: ModelConfig, shard: Shard | None = None) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every weight the model loads (with `shard`: of that rank's part, parallel.py)."""
    full = cfg
    cfg = shard.local_config(cfg) if shard is not None else cfg
    q, kv, h, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, \
        cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (shard.vocab_rows(full.vocab_size) if shard is not None else cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (h,)})
    return shapes


def random_weights(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   shard: Shard | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(cfg, shard).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        else:  # drawn in the target dtype: no float32 temporaries (twice the size) to fragment device memory
            weights[name] = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
    return weights

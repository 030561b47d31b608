"""Frozen configuration: what the model is (ModelConfig), how the engine runs it (EngineConfig),
and what was learned at start-up (EngineInfo)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError("rope theta and factor must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder (Llama 2/3/3.1, SmolLM2, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """From a transformers PretrainedConfig (both the v4 and v5 dialects)."""
        model_type = getattr(hf, "model_type", "llama")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported model type {model_type!r} (llama, qwen2, mistral are supported)")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            rope=_rope_from_hf(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            dtype=str(dtype).replace("torch.", ""),
            model_type=model_type,
        )


def _rope_from_hf(hf: Any) -> RopeConfig:
    params: Mapping[str, Any] = dict(getattr(hf, "rope_parameters", None) or {})
    scaling: Mapping[str, Any] = dict(getattr(hf, "rope_scaling", None) or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0) or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", getattr(hf, "max_position_embeddings", 8192))),
    )


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Values learned at start-up live in EngineInfo."""

    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    page_size: int = 16
    num_pages: int | None = None  # None: size the pool from free memory
    # CUDA: the share of the device's memory for weights, activations, graphs and the KV pool (vLLM's
    # --gpu-memory-utilization); the pool gets what is left (engine/executor/memory.py).
    gpu_memory_utilization: float = 0.9
    kv_memory_fraction: float = 0.9  # CPU: of available host memory, capped by max_cpu_kv_bytes
    max_cpu_kv_bytes: int = 2 << 30
    max_batch_tokens: int = 4096  # per-step token budget (prefill chunks + decodes)
    max_batch_size: int = 256  # sequences per step
    cuda_graphs: bool = True
    # CUDA graphs: Triton kernels that fuse RoPE, the KV append, norms, SiLU and residual adds into their
    # neighbours at small batches (engine/executor/cuda_graphs.py). False: the unfused kernels (A/B runs).
    fused_decode: bool = True
    # CUDA graphs: steps with prefill tokens (up to piecewise_max_tokens) replay all but attention from per-layer
    # graphs (engine/executor/piecewise_graphs.py). False: they run eagerly (A/B runs).
    piecewise_graphs: bool = True
    piecewise_max_tokens: int = 512
    seed: int = 0
    # Ranks that split the model Megatron-style (engine/model/parallel.py), one device each: cuda:N..N+P-1 from
    # `device` cuda:N, or P processes on CPU (gloo; for tests). The model's heads, KV heads and MLP width must be
    # multiples of it (checked when the model is known).
    tensor_parallel_size: int = 1
    # Host memory for KV pages swapped out under pressure (vLLM's --swap-space), per rank, in GiB. Preempted
    # instances wait there; what wants more than the pool plus this fails a victim (docs/reliability.md).
    # None: min(1 GiB, as many pages as the pool).
    swap_space_gib: float | None = None

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError("num_pages must be positive")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError("kv_memory_fraction must be in (0, 1]")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_batch_tokens <= 0 or self.max_batch_size <= 0:
            raise ValueError("max_batch_tokens and max_batch_size must be positive")
        if self.piecewise_max_tokens <= 0:
            raise ValueError("piecewise_max_tokens must be positive")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.swap_space_gib is not None and not self.swap_space_gib > 0:
            raise ValueError(f"swap_space_gib must be positive, got {self.swap_space_gib}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"tensor parallelism runs on cpu or cuda, not {self.device!r}")

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"


@dataclass(frozen=True)
class EngineInfo:
    """Learned at start-up: what the KV pool turned out to be."""

    num_pages: int
    page_size: int
    max_context_len: int
    kv_bytes_per_page: int

"""Shared pieces of the GPU benchmarks: model shapes, the memory-bandwidth floor, result files, tables,
and FlashInfer's compiled-kernel cache.

    python -m bench.common_gpu precompile            # compile every FlashInfer module the engine uses, in parallel
    python -m bench.common_gpu export-aot OUT.tar.gz # pack the compiled modules; unpack into flashinfer/data/aot

The floor of a decode step is the bytes it must read (every weight once, plus the K/V of every context
token of every sequence) over the device-to-device copy bandwidth measured in the same run (bytes read +
written per second, the most a kernel can stream).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pie_server.engine.config import ModelConfig, RopeConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"

MODEL_SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        dtype="bfloat16"),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope=RopeConfig(theta=100000.0), tie_word_embeddings=True, dtype="bfloat16"),
}


# -- the bandwidth floor --------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device | str = "cuda", num_bytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes * iters / seconds


def weight_bytes_per_step(cfg: ModelConfig, elem_bytes: int, batch_size: int) -> int:
    """Every layer's matrices and norms, the final norm and the LM head, plus the embedding rows looked up."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = (q + 2 * kv) * cfg.hidden_size + cfg.hidden_size * q + 3 * cfg.hidden_size * cfg.intermediate_size \
        + 2 * cfg.hidden_size
    params = cfg.num_layers * per_layer + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size \
        + batch_size * cfg.hidden_size
    return params * elem_bytes


def kv_bytes_per_token(cfg: ModelConfig, elem_bytes: int) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem_bytes


def decode_floor_s(cfg: ModelConfig, elem_bytes: int, context_lens: Sequence[int], bandwidth: float) -> float:
    """Seconds a decode step must take at least: bytes read (weights + each sequence's K/V) / bandwidth."""
    total = weight_bytes_per_step(cfg, elem_bytes, len(context_lens)) + \
        kv_bytes_per_token(cfg, elem_bytes) * sum(context_lens)
    return total / bandwidth


# -- reporting ------------------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "card": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import flashinfer
        info["flashinfer"] = flashinfer.__version__
    except ImportError:
        info["flashinfer"] = None
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def graph_replay_s(executor: Any, batch: int, iters: int = 50) -> float | None:
    """GPU seconds of one captured decode forward of `batch`'s bucket (as last planned), replayed back to back;
    None without decode graphs."""
    graphs = executor.decode_graphs
    if graphs is None:
        return None
    entry = graphs._graphs[graphs.bucket(batch)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        entry.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def save_result(name: str, record: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Writes bench/results/<name>.json with the card, the command line and the numbers."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    payload = {"benchmark": name, "command": "python -m " + " ".join([_module_name(), *sys.argv[1:]]),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_info(), **record}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, rule, *body])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


# -- FlashInfer's compiled modules ----------------------------------------------------------------------

# One process per module: FlashInfer compiles each with nvcc on first use (prefill ~2 min), so compiling them
# side by side takes about as long as the slowest.
_VARIANTS = {
    "decode-bf16-128": ("decode", (32, 8, 128), torch.bfloat16),
    "decode-bf16-64": ("decode", (9, 3, 64), torch.bfloat16),
    "decode-fp16-128": ("decode", (32, 8, 128), torch.float16),
    "prefill-bf16-128": ("prefill", (32, 8, 128), torch.bfloat16),
    "prefill-bf16-64": ("prefill", (9, 3, 64), torch.bfloat16),
    "prefill-fp16-128": ("prefill", (32, 8, 128), torch.float16),
    "packbits": ("packbits", None, None),
    "norm": ("norm", None, torch.bfloat16),
    "rope": ("rope", None, torch.bfloat16),
    "silu": ("silu", None, torch.bfloat16),
}


def _compile_variant(name: str) -> None:
    """Runs the smallest call that makes FlashInfer build (or load) one module."""
    kind, heads, dtype = _VARIANTS[name]
    if kind in ("decode", "prefill"):
        from pie_server.kernels.attention import AttentionStep
        from pie_server.kernels.flashinfer_attention import AttentionShape, FlashInferAttention
        num_qo, num_kv, dim = heads
        q_len = 1 if kind == "decode" else 3
        backend = FlashInferAttention("cuda", AttentionShape(num_qo, num_kv, dim, dtype))
        backend.plan(AttentionStep(16, [0, q_len], [0, 1], [0], [3], list(range(3 - q_len, 3))))
        q = torch.zeros(q_len, num_qo, dim, device="cuda", dtype=dtype)
        k = torch.zeros(q_len, num_kv, dim, device="cuda", dtype=dtype)
        backend.forward(q, k, k.clone(), torch.zeros(1, 2, 16, num_kv, dim, device="cuda", dtype=dtype))
    elif kind == "packbits":
        import flashinfer
        flashinfer.quantization.segment_packbits(torch.ones(8, dtype=torch.bool, device="cuda"),
                                                 torch.tensor([0, 8], device="cuda"), bitorder="little")
    else:
        import pie_server.kernels.gpu_ops as ops
        x = torch.ones(2, 64, device="cuda", dtype=dtype)
        if kind == "norm":
            ops.rms_norm(x, x[0], 1e-5)
            ops.add_rms_norm(x.clone(), x.clone(), x[0], 1e-5)
        elif kind == "silu":
            ops.silu_and_mul(x)
        else:
            cache = torch.zeros(8, 64, device="cuda")
            qk = torch.zeros(2, 3, 64, device="cuda", dtype=dtype)
            ops.apply_rope(qk[:, :2], qk[:, 2:], torch.zeros(2, dtype=torch.long, device="cuda"), cache)
    torch.cuda.synchronize()


def precompile(names: Sequence[str] = tuple(_VARIANTS)) -> dict[str, float]:
    """Compiles the modules in parallel processes; returns seconds per module (raises if one failed)."""
    started = time.perf_counter()
    procs = {n: subprocess.Popen([sys.executable, "-m", "bench.common_gpu", "compile-one", n]) for n in names}
    seconds = {}
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"compiling FlashInfer module {name} failed")
        seconds[name] = round(time.perf_counter() - started, 1)
    return seconds


def export_aot(dest: Path) -> list[str]:
    """Packs every compiled module as <name>/<name>.so: FlashInfer loads such files from flashinfer/data/aot
    without running ninja (its JIT directory would be rebuilt when the wheel's sources get new timestamps)."""
    from flashinfer.jit import env as jit_env
    names = []
    with tarfile.open(dest, "w:gz") as tar:
        for so in sorted(Path(jit_env.FLASHINFER_JIT_DIR).glob("*/*.so")):
            if so.stem == so.parent.name:
                tar.add(so, arcname=f"{so.parent.name}/{so.name}")
                names.append(so.parent.name)
    return names


def main(argv: Sequence[str]) -> None:
    command = argv[0] if argv else ""
    if command == "compile-one":
        _compile_variant(argv[1])
    elif command == "precompile":
        print(json.dumps(precompile(argv[1:] or tuple(_VARIANTS)), indent=1))
    elif command == "export-aot":
        print("packed:", ", ".join(export_aot(Path(argv[1]))))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")
    main(sys.argv[1:])

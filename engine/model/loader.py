"""Finding a model and reading it: a local Hugging Face directory, a GGUF file, or the embedded default.

A model is always served from a Hugging Face directory (config.json, *.safetensors, tokenizer files, chat
template). A GGUF file is dequantized once through transformers and cached as such a directory under
`<cache root>/gguf/<key>/`, where the cache root is `cache_dir`, else `$PIE_CACHE_DIR`, else
`$XDG_CACHE_HOME/pie` (default `~/.cache/pie`), and the key hashes the GGUF's absolute path, size and
mtime. A conversion is written to a hidden staging directory and renamed into place, so the cache never
holds a half-written model: a directory under its final name is complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm  # the type of _gguf_bar's stand-in

from pie_server.engine.config import ModelConfig
from pie_server.engine.model.default_model import locate_default_model
from pie_server.engine.model.parallel import Shard
from pie_server.engine.processes import is_alive
from pie_server.engine.progress import progress_bar, progress_spinner

__all__ = ["locate_default_model", "resolve_model_dir", "cache_root", "gguf_cache_key", "convert_gguf",
           "load_model_config", "load_weights", "safetensors_files"]

logger = logging.getLogger(__name__)

# Bump when the layout of a converted directory changes: old cache entries are then ignored.
GGUF_CACHE_VERSION = 1
GGUF_MAGIC = b"GGUF"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
SOURCE_RECORD_FILE = "pie_source.json"
_GGUF_BAR_LOCK = threading.Lock()  # see _gguf_bar
# Any of these makes a directory's tokenizer loadable by AutoTokenizer (tiktoken models ship *.tiktoken or
# a tiktoken-format tokenizer.model next to tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------- resolving

def resolve_model_dir(path: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory to serve `path` from.

    None -> the embedded default model (converted from its GGUF, cached). A directory is checked and returned
    as is. A `.gguf` file is converted on first use and served from the cache afterwards.
    """
    source = locate_default_model() if path is None else Path(path).expanduser()
    if source.is_dir():
        check_model_dir(source)
        return source
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ValueError(f"{source} is neither a model directory nor a .gguf file")
        return _cached_gguf_dir(source.resolve(), cache_root(cache_dir))
    raise FileNotFoundError(f"no model at {source}: expected a local Hugging Face model directory "
                            "(config.json + *.safetensors + tokenizer) or a .gguf file")


def check_model_dir(model_dir: Path) -> None:
    """Raise FileNotFoundError naming what a Hugging Face model directory lacks."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: it has no config.json")
    safetensors_files(model_dir)
    has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
    if not has_tokenizer and not any(model_dir.glob("*.tiktoken")):
        raise FileNotFoundError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}, "
                                "*.tiktoken)")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: cache_dir, else $PIE_CACHE_DIR, else $XDG_CACHE_HOME/pie."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PIE_CACHE_DIR"):
        return Path(os.environ["PIE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pie"


def gguf_cache_key(gguf_path: Path) -> str:
    """Hash of the absolute path, size and mtime: a replaced or touched file gets a fresh conversion."""
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0v{GGUF_CACHE_VERSION}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _cached_gguf_dir(gguf_path: Path, root: Path) -> Path:
    final_dir = root / "gguf" / gguf_cache_key(gguf_path)
    if final_dir.is_dir():
        return final_dir
    _check_gguf_magic(gguf_path)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging_dirs(final_dir)
    staging_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging_dir.mkdir()
    try:
        logger.warning("converting %s to a Hugging Face directory (once; cached in %s)", gguf_path, final_dir)
        convert_gguf(gguf_path, staging_dir)
        _write_source_record(gguf_path, staging_dir)
        _publish(staging_dir, final_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)  # gone already after a successful rename
    return final_dir


def _publish(staging_dir: Path, final_dir: Path) -> None:
    """Atomic rename into place; if another process published the same key first, keep theirs."""
    try:
        os.rename(staging_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise


def _remove_stale_staging_dirs(final_dir: Path) -> None:
    """Staging directories of this key whose process is gone (a crash mid-conversion)."""
    for staging in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        pid_text = staging.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not is_alive(int(pid_text)):
            shutil.rmtree(staging, ignore_errors=True)


def _check_gguf_magic(gguf_path: Path) -> None:
    with open(gguf_path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{gguf_path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def _write_source_record(gguf_path: Path, out_dir: Path) -> None:
    import transformers

    stat = gguf_path.stat()
    record = {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "cache_version": GGUF_CACHE_VERSION, "transformers": transformers.__version__}
    (out_dir / SOURCE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- converting

def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Write a Hugging Face directory for a GGUF file into out_dir (which must exist).

    Weights are dequantized by transformers (which also un-permutes Llama q/k) and stored in float32, the
    exact dequantized values. Tied embeddings are stored once (no lm_head.weight). With progress (drawn
    only where engine/progress.py says): a bar over the GGUF's tensors while they are dequantized, then the
    elapsed time of writing them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A meta model maps GGUF tensor names to HF names without allocating (and without `accelerate`).
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(hf_config)
    with _gguf_bar(progress):
        loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=meta_model)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    tensors = _checked_tensors(loaded["tensors"], meta_model.state_dict(), tied, gguf_path)
    with progress_spinner(f"writing {WEIGHTS_FILE} (float32)", progress):
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    del tensors, loaded

    _set_config_dtype(hf_config, torch.float32)
    hf_config.architectures = [type(meta_model).__name__]
    hf_config.save_pretrained(out_dir)
    _save_generation_config(hf_config, out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


@contextmanager
def _gguf_bar(progress: bool) -> Iterator[None]:
    """transformers draws its own tqdm bar over the GGUF's tensors, always, to stderr: for the call, swap in
    ours (named, and drawn only where engine/progress.py says) by replacing the name its module looks up. If a
    transformers version no longer has that name, its bar (if any) is left as it is. The lock keeps conversions
    of two threads from restoring each other's stand-in."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def ours(iterable: Any = None, **kwargs: Any) -> tqdm:
        return progress_bar("dequantizing GGUF", iterable, total=kwargs.get("total"), enabled=progress,
                            unit="tensor")

    with _GGUF_BAR_LOCK:
        original = getattr(gguf_utils, "tqdm", None)
        if original is None:
            yield
            return
        gguf_utils.tqdm = ours
        try:
            yield
        finally:
            gguf_utils.tqdm = original


def _checked_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tied: bool,
                     gguf_path: Path) -> dict[str, torch.Tensor]:
    """The tensors the model expects, float32 and contiguous; a clear error for missing or misshapen ones."""
    expected_shapes = {name: tuple(t.shape) for name, t in expected.items()}
    if tied:
        expected_shapes.pop("lm_head.weight", None)
    missing = sorted(set(expected_shapes) - set(tensors))
    if missing:
        raise ValueError(f"{gguf_path} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    extra = sorted(set(tensors) - set(expected_shapes))
    if extra:
        logger.warning("ignoring %d GGUF tensors the model does not use, e.g. %s", len(extra), extra[:3])
    checked = {}
    for name, shape in expected_shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{gguf_path}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
        checked[name] = tensor.to(torch.float32).contiguous()
    return checked


def _set_config_dtype(hf_config: Any, dtype: torch.dtype) -> None:
    # transformers 5 names it `dtype`, transformers 4 `torch_dtype`.
    if "dtype" in vars(hf_config) or not hasattr(hf_config, "torch_dtype"):
        hf_config.dtype = dtype
    else:
        hf_config.torch_dtype = dtype


def _save_generation_config(hf_config: Any, out_dir: Path) -> None:
    """generation_config.json with the special token ids the GGUF declares (if it declares an eos)."""
    if getattr(hf_config, "eos_token_id", None) is None:
        return
    ids = {key: getattr(hf_config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    record = {key: value for key, value in ids.items() if value is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- reading

def load_model_config(model_dir: str | Path) -> ModelConfig:
    """The architecture of a model directory, through AutoConfig (transformers 4 and 5 config dialects)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    return ModelConfig.from_hf(AutoConfig.from_pretrained(str(model_dir)))


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a directory: those of the shard index if there is one, else every *.safetensors."""
    model_dir = Path(model_dir)
    index_path = model_dir / SHARD_INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{model_dir} lacks shards named in its index: {absent}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights (only safetensors are supported)")
    return files


def load_weights(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu", *,
                 progress: bool = True, shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files by its Hugging Face name.

    Floating-point tensors are cast to `dtype` and moved to `device`; others keep their dtype. With progress,
    a bar over the files' bytes (advanced per tensor) goes to stderr where engine/progress.py says to draw.
    With `shard` (a tensor-parallel rank), only that rank's part of each tensor is read (parallel.py): a 70B
    model's eight ranks do not each hold the whole model in host memory.
    """
    files = safetensors_files(model_dir)
    device = torch.device(device)
    names_by_file = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names_by_file[path] = list(handle.keys())
    weights: dict[str, torch.Tensor] = {}
    file_sizes = {path: path.stat().st_size for path in files}
    with progress_bar("loading weights", total=sum(file_sizes.values()), enabled=progress, unit="B",
                      unit_scale=True, unit_divisor=1024) as bar:
        for path, names in names_by_file.items():
            if len(files) > 1:
                bar.set_postfix_str(path.name, refresh=False)
            done_before = bar.n
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in names:
                    if name in weights:
                        raise ValueError(f"tensor {name} appears in more than one file of {model_dir}")
                    tensor = handle.get_tensor(name) if shard is None else _read_shard(handle, name, shard)
                    bar.update(tensor.nbytes)
                    weights[name] = _cast(tensor, dtype, device)
            bar.update(done_before + file_sizes[path] - bar.n)  # the file's header: the bar ends at its size
    return weights


def _read_shard(handle: Any, name: str, shard: Shard) -> torch.Tensor:
    part = handle.get_slice(name)
    return shard.read(name, part, tuple(part.get_shape()))


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)

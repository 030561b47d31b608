#!/usr/bin/env bash
# On the CPU machine, before a GPU session: builds what scripts/gpu_serving.sh and scripts/gpu_session.sh carry
# (both git-ignored, so a fresh checkout has neither):
#   .whl/        ../shared/gpu/fetch-wheels with the extra wheels the benchmarks and tests use there (the OpenAI
#                client, msgspec, pyzmq, prometheus-client, jsonschema, llguidance, interegular, py-spy), Python 3.12 x86_64
#   .gpu-model/  smollm2/ (the default model's config and tokenizer), llama-3.1-8b/ (Llama-3.1-8B's config and
#                SmolLM2's tokenizer padded to 128,256 ids, gzipped: random weights emit any id), pie-cache/
#                inferlets/<key>.wasm.xz (the default inferlet, built here: nothing is compiled there), vllm-serve.sh and vllm-offline.py
#                (../shared/peers/vllm/serve.sh, offline.py)
#
#   bash scripts/gpu_prepare.sh [--agentic]  # after `make install`; about a minute with warm caches
# The two folders plus the tracked tree stay under the 64 MiB carry limit with room for a .base/tree.tgz (an A/B
# against an older commit). --agentic also builds react-agent (6.5 MB, for `gpu_serving.sh agentic`) into
# .agentwasm/: carry [".agentwasm"] in the agentic call, after a first call that carried the other two.
# Then pass carry [".whl", ".gpu-model"] and start the device command with `bash scripts/gpu_serving.sh setup ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTIC=0; [ "${1:-}" = --agentic ] && AGENTIC=1
ROOT=$PWD; PY=$ROOT/.venv/bin/python; G=$ROOT/.gpu-model
[ -x "$PY" ] || { echo "run make install first"; exit 2; }
for d in /.whl/ /.gpu-model/ /.agentwasm/ /.base/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done

# The server's packages at requirements/gpu.lock's versions (fetch-wheels names some unpinned: wasmtime 51 came
# out on 2026-12-04, and the runtime refuses any wasmtime but its pinned one); .whl/ starts empty, so no
# earlier download is installed beside them.
pinned() { for name in "$@"; do grep -m1 -i "^$name==" requirements/gpu.lock | cut -d' ' -f1; done; }
rm -rf .whl
../shared/gpu/fetch-wheels $(pinned wasmtime starlette uvicorn sse-starlette h11 anyio sniffio msgspec pyzmq \
  prometheus-client jsonschema jsonschema-specifications referencing rpds-py attrs interegular) \
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore pydantic==2.14.4 pydantic-core==2.50.5 jiter \
  annotated-types typing-inspection idna click
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 -d .whl llguidance==1.9.1
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_5_x86_64 -d .whl py-spy==0.4.3  # `gpu_serving.sh profile` (a binary in /tmp/site/bin)

rm -rf "$G" .agentwasm && mkdir -p "$G/smollm2" "$G/llama-3.1-8b" "$G/pie-cache/inferlets"
cp ../shared/peers/vllm/serve.sh "$G/vllm-serve.sh"
cp ../shared/peers/vllm/offline.py "$G/vllm-offline.py"
# -P: the checkout is not put on sys.path (its kernels/ folder would shadow the `kernels` package transformers probes)
"$PY" -P - "$G" "$AGENTIC" <<'EOF'
import gzip, json, lzma, shutil, sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from pie_server.app.inferlet_build import build_inferlet, find_source, source_hash
from pie_server.engine.model.loader import resolve_model_dir
from pie_server.inferlets import CONTRIB_DIR, DEFAULT_INFERLET_SOURCE

out = Path(sys.argv[1])
smollm2 = resolve_model_dir(None)  # the embedded model, converted to a Hugging Face folder (cached)
for f in smollm2.iterdir():
    if f.suffix in (".json", ".jinja") and f.is_file():
        shutil.copy(f, out / "smollm2" / f.name)

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
}
llama = out / "llama-3.1-8b"
(llama / "config.json").write_text(json.dumps(LLAMA_8B, indent=1) + "\n")
for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (smollm2 / name).is_file():
        shutil.copy(smollm2 / name, llama / name)
tok = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
tok.add_tokens([AddedToken(f"~{i}", normalized=False) for i in range(tok.get_vocab_size(), 128256)])
assert tok.get_vocab_size() == 128256, tok.get_vocab_size()
with gzip.open(llama / "tokenizer.json.gz", "wt") as f:
    f.write(tok.to_str())

# react-agent's build goes to .agentwasm/ (carried by the `agentic` call); gpu_serving.sh unpacks both folders'
# builds into the build cache.
for source, folder in ((DEFAULT_INFERLET_SOURCE, out / "pie-cache" / "inferlets"),
                       *([(CONTRIB_DIR / "react-agent", out.parent / ".agentwasm")] if sys.argv[2] == "1" else [])):
    key = source_hash(find_source(source))  # the name the GPU machine's build cache looks for
    built = build_inferlet(source, Path("/tmp") / f"pie-gpu-prepare-{key}.wasm", progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    # xz, a third smaller than gzip: .whl/, .gpu-model/, .agentwasm/ and a .base/tree.tgz then fit one carry
    with open(built, "rb") as src, lzma.open(folder / f"{key}.wasm.xz", "wb", preset=9 | lzma.PRESET_EXTREME) as dst:
        shutil.copyfileobj(src, dst)
    print(f"{source.name}: {key}")
EOF
du -sh .whl "$G"

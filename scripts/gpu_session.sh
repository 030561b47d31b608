#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, restore FlashInfer's compiled kernels, then run the
# parts named on the command line, each under a time limit, writing logs and results under $OUT.
#
#   bash scripts/gpu_session.sh tests decode throughput http      (any subset, in the order given)
#   parts: tests (all `gpu` tests), kernels (the Triton kernels' and the executor's GPU tests), decode,
#   gemv-fused (fused GEMV tiles), decode-ab (fused vs unfused kernels, one process), pdl-ab (8B batch 1
#   without, then with programmatic dependent launch), profile (8B batch-1 step), throughput, http.
#   Triton's compiled kernels go to $OUT/triton-cache.tar.gz; carry it back as .fi-cache/triton-cache.tar.gz.
#
# Needs, in the working tree (git-ignored, passed with the device tool's `carry`):
#   .whl/                 bash scripts/gpu_prepare.sh (the wheels at requirements/gpu.lock's versions: plain
#                         ../shared/gpu/fetch-wheels now fetches wasmtime 51, which the runtime refuses)
#   .fi-cache/aot.tar.gz  python -m bench.common_gpu export-aot, from an earlier GPU run (else ~2 min of JIT)
#   .gpu-model/           for `http`: what scripts/gpu_serving.sh's header lists (smollm2/, llama-3.1-8b/,
#                         pie-cache/inferlets/<hash>.wasm.gz: the default inferlet as `make serve` built it on the
#                         CPU machine, ~/.cache/pie/inferlets/<hash>.wasm, hash = pie_server.app.inferlet_build.source_hash)
set -o pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD; G=$ROOT/.gpu-model; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stamp() { echo "[t=${SECONDS}s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ROOT"/.whl/*.whl || exit 1
# The import root pie_server without a build step (the machine has no network): links to the design's folders,
# the same mapping as pyproject.toml's package-dir (docs/decisions/import-root.md).
mkdir -p /tmp/site/pie_server && for d in app engine kernels inferlets; do ln -sfn "$ROOT/$d" /tmp/site/pie_server/$d; done
export PYTHONPATH=/tmp/site:$PYTHONPATH
if [ -f "$ROOT/.fi-cache/aot.tar.gz" ]; then
  mkdir -p /tmp/site/flashinfer/data/aot && tar xzf "$ROOT/.fi-cache/aot.tar.gz" -C /tmp/site/flashinfer/data/aot
fi
export TRITON_CACHE_DIR=/tmp/triton-cache; mkdir -p $TRITON_CACHE_DIR
if [ -f "$ROOT/.fi-cache/triton-cache.tar.gz" ]; then tar xzf "$ROOT/.fi-cache/triton-cache.tar.gz" -C $TRITON_CACHE_DIR; fi
stamp "setup done"

for part in "$@"; do
  case $part in
    # tests/app and tests/inferlets hold no gpu test; their modules import the OpenAI client, not carried.
    tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/engine 2>&1 | tail -4 ;;
    kernels) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_gemv_fused.py \
               tests/kernels/test_decode_triton_gpu.py tests/kernels/test_triton_attention.py \
               tests/engine/executor/test_gpu_executor.py 2>&1 | tail -15 ;;
    gemv-fused) timeout 300 python3 -m bench.gpu_gemv_fused --sweep 2>&1 | tail -40 ;;
    decode) timeout 200 python3 -m bench.gpu_decode 2>&1 | tail -8 ;;
    decode-ab) timeout 300 python3 -m bench.gpu_decode --compare-unfused 2>&1 | tail -14 ;;
    pdl-ab) PIE_TRITON_PDL=0 timeout 200 python3 -m bench.gpu_decode --shapes llama-3.1-8b --batches 1 2>&1 | tail -5
            cp "$ROOT/bench/results/gpu_decode.json" "$OUT/gpu_decode_no_pdl.json"
            timeout 200 python3 -m bench.gpu_decode --shapes llama-3.1-8b --batches 1 2>&1 | tail -3 ;;
    profile) timeout 150 python3 -m bench.gpu_profile_decode llama-3.1-8b > "$OUT/profile_8b_b1.txt" 2>&1
             head -16 "$OUT/profile_8b_b1.txt" ;;
    throughput) timeout 300 python3 -m bench.gpu_throughput --sync-baseline 2>&1 | tee "$OUT/throughput.log" | tail -5
                grep "GPU memory" "$OUT/throughput.log" ;;
    http) bash "$ROOT/scripts/gpu_serving.sh" models pie smollm2-135m 2 pie llama-3.1-8b 2 ;;
    *) echo "unknown part $part (tests, kernels, gemv-fused, decode, decode-ab, pdl-ab, profile, throughput, http)"; exit 2 ;;
  esac
  stamp "$part rc=$?"
  cp "$ROOT"/bench/results/gpu_*.json "$OUT"/ 2>/dev/null
done
tar czf "$OUT/triton-cache.tar.gz" -C $TRITON_CACHE_DIR . 2>/dev/null

#!/usr/bin/env bash
# HTTP end to end on the GPU machine (called by scripts/gpu_session.sh after its set-up): random bf16 weights of
# the SmolLM2-135M and Llama-3.1-8B shapes, `pie serve`, then bench/http_load.py at concurrency 1/16/64/256.
ROOT=$PWD; G=$ROOT/.gpu-model; OUT=${OUT:-/tmp/out}
WASM_GZ=$(ls "$G"/pie-cache/inferlets/*.wasm.gz | head -1)
# componentize-py is not carried (too big); its version is part of the inferlet cache key.
mkdir -p /tmp/site/componentize_py-0.25.1.dist-info
printf 'Metadata-Version: 2.1\nName: componentize-py\nVersion: 0.25.1\n' > /tmp/site/componentize_py-0.25.1.dist-info/METADATA
export PIE_CACHE_DIR=/tmp/pie-cache; mkdir -p $PIE_CACHE_DIR/inferlets
WASM=$PIE_CACHE_DIR/inferlets/$(basename "$WASM_GZ" .gz); gunzip -c "$WASM_GZ" > "$WASM" || exit 1

wait_health() {  # port pid
  for _ in $(seq 300); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/health', timeout=2)" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server died"; return 1; }
    sleep 1
  done
  echo "health timeout"; return 1
}
run_shape() {  # name model_dir port requests_high
  python3 bench/make_random_model.py "$2" --device cuda > /dev/null || return 1
  python3 -m pie_server.app.cli serve --model "$2" --device cuda --port "$3" --served-model-name "$1" --default-inferlet "$WASM" \
    --log-level warning > "$OUT/serve_$1.log" 2>&1 &
  local pid=$!
  wait_health "$3" $pid || { tail -30 "$OUT/serve_$1.log"; return 1; }
  timeout 120 python3 bench/http_load.py --url "http://127.0.0.1:$3" --model "$1" --concurrency 1 16 \
    --requests-per-level 32 --max-tokens 128 --json "$OUT/http_$1_lo.json" | tail -3
  timeout 200 python3 bench/http_load.py --url "http://127.0.0.1:$3" --model "$1" --concurrency 64 256 \
    --requests-per-level "$4" --max-tokens 128 --json "$OUT/http_$1_hi.json" | tail -3
  kill $pid; wait $pid 2>/dev/null
}
S=/tmp/smollm2-135m; mkdir -p $S; cp "$G"/*.json "$G"/*.jinja $S/
run_shape smollm2-135m $S 8000 512
B=/tmp/llama-3.1-8b; mkdir -p $B; cp "$G"/llama-3.1-8b/* $B/
run_shape llama-3.1-8b $B 8001 256

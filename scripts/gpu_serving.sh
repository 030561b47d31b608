#!/usr/bin/env bash
# Serving side by side on the GPU machine: `pie serve` and vLLM's OpenAI server over the same random-weight
# models, measured by the same load generator (bench/http_load.py), one server at a time.
#
#   bash scripts/gpu_serving.sh setup                 # first call: wheels, model folders (random bf16), a gpu test
#   bash scripts/gpu_serving.sh pie SHAPE [N]         # pie serve --api-processes N (default 1)
#   bash scripts/gpu_serving.sh base-pie SHAPE N      # the same over .base/tree.tgz's code (see base-breakdown)
#   bash scripts/gpu_serving.sh models                # only the model folders
#   bash scripts/gpu_serving.sh tax SHAPE [N]         # bench/programmability_tax.py --api-processes N (default 0;
#                                                     # TAX_REPEATS=9: more repeats than 3)
#   bash scripts/gpu_serving.sh base-tax SHAPE [N]    # the tax over .base/tree.tgz's code (see base-breakdown):
#                                                     # $OUT/tax_SHAPE_apN_base.json
#   bash scripts/gpu_serving.sh tax-profile SHAPE B   # py-spy over the tax bench at batch B (ap 1, 256 tokens,
#                                                     # after a 45 s warm-up):
#                                                     # $OUT/tax_profile_SHAPE_bB.{txt,raw,json}
#   bash scripts/gpu_serving.sh tax-steps SHAPE B     # the tax bench at batch B with the engine core's step log
#                                                     # (base-tax-steps: over .base/tree.tgz): $OUT/tax_steps_*.txt
#   bash scripts/gpu_serving.sh agentic SHAPE ARGS... # python -m bench.agentic on SHAPE (consumes the rest; ARGS
#                                                     # override, e.g. --concurrency 1 16 128); $OUT/agentic_SHAPE.json
#                                                     # (needs react-agent's build: `gpu_prepare.sh --agentic`,
#                                                     # carry [".agentwasm"] in this call)
#   bash scripts/gpu_serving.sh base-agentic SHAPE ARGS... # the same over .base/tree.tgz's code (see base-breakdown;
#                                                     # archive scripts/ too): $OUT/agentic_SHAPE_base.json
#   bash scripts/gpu_serving.sh profile SHAPE N C [S] # py-spy over `pie serve --api-processes N` for S seconds (15)
#                                                     # under bench/http_load.py at concurrency C: $OUT/profile_*.txt
#   bash scripts/gpu_serving.sh agentic-profile SHAPE C [S] # py-spy over bench.agentic at concurrency C for S seconds
#                                                     # (20) after a 35 s warm-up: $OUT/agentic_profile_SHAPE_cC.txt
#   bash scripts/gpu_serving.sh vllm SHAPE            # after ../shared/peers/vllm's assemble.sh installed vLLM
#   bash scripts/gpu_serving.sh vllm-offline SHAPE    # vLLM's offline.py: TPOT at batch 1 and 64, 512 x (512 + 256)
#   bash scripts/gpu_serving.sh offline SHAPE         # python -m bench.gpu_throughput: our 512 x (512 + 256)
#   bash scripts/gpu_serving.sh decode SHAPE CONTEXT  # python -m bench.gpu_decode at batch 1, 16, 64 (TPOT, floor)
#   bash scripts/gpu_serving.sh mixed SHAPE           # python -m bench.gpu_mixed_steps (piecewise graphs vs eager)
#   bash scripts/gpu_serving.sh tp                    # tensor parallelism vs TP=1 (pytest -m gpu, needs 2+ GPUs)
#   bash scripts/gpu_serving.sh tp-bench ARGS...      # python -m bench.tp_decode ARGS (consumes the rest)
#   bash scripts/gpu_serving.sh grammar-masks SHAPE   # python -m bench.grammar_masks (this host's CPUs): $OUT/grammar_masks_SHAPE.txt
#   bash scripts/gpu_serving.sh gpu-tests             # the whole pytest -m gpu
#   bash scripts/gpu_serving.sh gpu-test PATH         # pytest -m gpu PATH (a file, or FILE::TEST)
#   bash scripts/gpu_serving.sh breakdown SHAPE TAG   # python -m bench.gpu_host_breakdown: $OUT/breakdown_SHAPE_TAG.txt
#   bash scripts/gpu_serving.sh base-breakdown SHAPE TAG # the same over an older commit's code, carried as .base/tree.tgz
#                                                     # (`git archive --format=tar.gz REV engine kernels bench app
#                                                     # inferlets ':!bench/results' > .base/tree.tgz`), kept in /tmp/base
#   SHAPE: smollm2-135m or llama-3.1-8b. Several commands chain: `... setup pie smollm2-135m 1 pie llama-3.1-8b 1`
#
# `bash scripts/gpu_prepare.sh` builds both carried folders on the CPU machine. The first call carries .whl/
# (../shared/gpu/fetch-wheels with the client wheels of docs/benchmarks.md, msgspec,
# pyzmq; llguidance 1.9.1 by pip download, manylinux_2_31) and .gpu-model/ (smollm2/ config and tokenizer,
# llama-3.1-8b/ config and a gzipped tokenizer of 128,256 ids, pie-cache/inferlets/<hash>.wasm.xz of the default
# and react-agent inferlets (built here; the key covers the SDK and WIT, so rebuild them after changing those),
# vllm-serve.sh = ../shared/peers/vllm/serve.sh); they are copied to /tmp/carry, which later calls of the same
# warm machine use. Results: $OUT/{pie,vllm}_SHAPE*_{lo,hi}.json, $OUT/agentic_SHAPE.json.
set -o pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD; OUT=${OUT:-/tmp/out}; C=/tmp/carry; M=/tmp/models; mkdir -p "$OUT"
stamp() { echo "[t=${SECONDS}s] $*"; }

env_setup() {
  if [ -d "$ROOT/.whl" ]; then mkdir -p $C && cp -r "$ROOT/.whl" "$ROOT/.gpu-model" $C/; fi
  [ -d /tmp/site/uvicorn ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/.whl/*.whl
  # The import root without a build step: links to this call's checkout (docs/decisions/import-root.md).
  mkdir -p /tmp/site/pie_server && for d in app engine kernels inferlets; do ln -sfn "$ROOT/$d" /tmp/site/pie_server/$d; done
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  # componentize-py is not carried (too big); its version is part of the inferlet cache key.
  mkdir -p /tmp/site/componentize_py-0.25.1.dist-info
  printf 'Metadata-Version: 2.1\nName: componentize-py\nVersion: 0.25.1\n' > /tmp/site/componentize_py-0.25.1.dist-info/METADATA
  # Every carried build (the default inferlet, react-agent for `agentic`) lands in the build cache under its key,
  # so build_inferlet finds it and never runs componentize-py here.
  export PIE_CACHE_DIR=/tmp/pie-cache; mkdir -p $PIE_CACHE_DIR/inferlets
  local gz wasm
  # Builds come as <key>.wasm.xz (gpu_prepare.sh; a third smaller than gzip) or, from older preparations, .wasm.gz.
  if [ -d "$ROOT/.agentwasm" ]; then mkdir -p $C/.gpu-model/pie-cache/inferlets && cp "$ROOT"/.agentwasm/*.wasm.?z $C/.gpu-model/pie-cache/inferlets/; fi
  for gz in $C/.gpu-model/pie-cache/inferlets/*.wasm.?z; do
    wasm=$PIE_CACHE_DIR/inferlets/$(basename "${gz%.*}"); [ -f "$wasm" ] || python3 -c "import gzip, lzma, shutil, sys
with (lzma if sys.argv[1].endswith('.xz') else gzip).open(sys.argv[1]) as src, open(sys.argv[2], 'wb') as dst: shutil.copyfileobj(src, dst)" "$gz" "$wasm"
  done
  WASM=$PIE_CACHE_DIR/inferlets/$(python3 -c "from pie_server.app.inferlet_build import find_source, source_hash
from pie_server.inferlets import DEFAULT_INFERLET_SOURCE as s; print(source_hash(find_source(s)))").wasm
  [ -f "$WASM" ] || echo "no carried build of the default inferlet for this checkout: $WASM"
}

make_models() {
  mkdir -p $M/smollm2-135m $M/llama-3.1-8b
  cp $C/.gpu-model/smollm2/* $M/smollm2-135m/
  cp $C/.gpu-model/llama-3.1-8b/* $M/llama-3.1-8b/ && gunzip -f $M/llama-3.1-8b/tokenizer.json.gz
  for shape in ${MODEL_SHAPES:-smollm2-135m llama-3.1-8b}; do  # MODEL_SHAPES=smollm2-135m: skip the 8B's 16 GB
    [ -f $M/$shape/model.safetensors ] || python3 bench/make_random_model.py $M/$shape --device cuda > /dev/null
  done
  ls -la $M/*/model.safetensors
}

breakdown() {  # shape tag tree: bench.gpu_host_breakdown of that tree's code, env as given to this script
  (cd "$3" && timeout 300 python3 -m bench.gpu_host_breakdown --shape "$1" --batches 16 64 2>&1 | tail -22 \
    | tee "$OUT/breakdown_$1_$2.txt")
}

base_site() {  # /tmp/sitebase/pie_server: the carried .base/tree.tgz (an older commit's code) for A/B runs
  [ -f "$ROOT/.base/tree.tgz" ] && rm -rf /tmp/base && mkdir -p /tmp/base && tar -xzf "$ROOT/.base/tree.tgz" -C /tmp/base
  mkdir -p /tmp/sitebase/pie_server && for d in app engine kernels inferlets; do ln -sfn /tmp/base/$d /tmp/sitebase/pie_server/$d; done
}

requests_high() { [ "$1" = smollm2-135m ] && echo 512 || echo 256; }

wait_health() {  # port pid
  for _ in $(seq 400); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/health', timeout=2)" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server died"; return 1; }
    sleep 1
  done
  echo "health timeout"; return 1
}

load() {  # url name tag; LOAD_ARGS: more bench/http_load.py options, LOAD_TAG: appended to the tag (e.g.
          # LOAD_ARGS=--json-schema LOAD_TAG=_json: structured output, into *_json_{lo,hi}.json);
          # LOAD_LEVELS=hi: only concurrency 64 and 256 (repeated A/B runs of the high levels)
  [ "${LOAD_LEVELS:-}" = hi ] || timeout 150 python3 bench/http_load.py --url "$1" --model "$2" --concurrency 1 16 --requests-per-level "${LO_REQUESTS:-32}" \
    --max-tokens 128 --json "$OUT/$3${LOAD_TAG:-}_lo.json" ${LOAD_ARGS:-} | tail -2
  timeout 240 python3 bench/http_load.py --url "$1" --model "$2" --concurrency 64 256 \
    --requests-per-level "$(requests_high "$2")" --max-tokens 128 --json "$OUT/$3${LOAD_TAG:-}_hi.json" ${LOAD_ARGS:-} | tail -2
}

pie_http() {  # shape api_processes; PIE_TAG names the results (pie_base for base-pie), PIE_SERVE_ARGS: more
             # `pie serve` flags (e.g. PIE_SERVE_ARGS="--warm-instances 0" PIE_TAG=cold), PIE_SERVE_ENV: its
             # environment (e.g. PIE_SERVE_ENV=PIE_GIL_SWITCH_INTERVAL_MS=5 PIE_TAG=gil5)
  local port=8000 tag=${PIE_TAG:-pie} trace=/tmp/trace_${PIE_TAG:-pie}_$1_ap$2 steps=/tmp/steps_${PIE_TAG:-pie}_$1_ap$2
  rm -f $trace.* $steps.jsonl
  PIE_REQUEST_TRACE=$trace PIE_STEP_LOG=$steps.jsonl env ${PIE_SERVE_ENV:-} python3 -m pie_server.app.cli serve --model $M/$1 --device cuda --port $port --served-model-name "$1" \
    --default-inferlet "$WASM" --log-level warning --api-processes "$2" ${PIE_SERVE_ARGS:-} \
    > "$OUT/serve_${tag}_$1_ap$2.log" 2>&1 &
  local pid=$!
  wait_health $port $pid || { tail -30 "$OUT/serve_${tag}_$1_ap$2.log"; return 1; }
  stamp "$tag $1 api-processes $2 ready"
  load "http://127.0.0.1:$port" "$1" "${tag}_$1_ap$2"
  kill $pid; wait $pid 2>/dev/null
  python3 scripts/trace_summary.py $trace | tee "$OUT/trace_${tag}_$1_ap$2.txt"  # app/request_trace.py
  python3 scripts/step_log_summary.py $steps.jsonl | tee "$OUT/steps_${tag}_$1_ap$2.txt"  # engine/control/step_log.py
  sleep 2
}

vllm_http() {  # shape
  local pid; pid=$(OUT=$OUT bash $C/.gpu-model/vllm-serve.sh $M/$1 "$1" 8002) || return 1
  stamp "vllm $1 ready"
  load "http://127.0.0.1:8002" "$1" "vllm_$1"
  kill "$pid"; wait "$pid" 2>/dev/null; pkill -f vllm.entrypoints 2>/dev/null; sleep 5
}

agentic() {  # shape [bench.agentic args...]: react-agent inferlet vs. OpenAI-client loop (docs/benchmarks.md).
            # A fresh machine's first server start compiles FlashInfer's and Triton's kernels (about two minutes):
            # give that run AGENTIC_TIMEOUT_S and agentic-profile's PROFILE_WARMUP_S room for it.
  [ -f $M/$1/model.safetensors ] || make_models > /dev/null
  local shape=$1 tag=$1${AGENTIC_TAG:-} steps=/tmp/steps_agentic_$1${AGENTIC_TAG:-}.jsonl; shift
  rm -f $steps
  PIE_STEP_LOG=$steps timeout "${AGENTIC_TIMEOUT_S:-450}" python3 -m bench.agentic --model $M/$shape --device cuda \
    --tasks-per-agent 2 --concurrency 1 2 4 8 16 32 64 128 "$@" --json "$OUT/agentic_$tag.json" 2>&1 \
    | tee "$OUT/agentic_$tag.log" | grep -E "^(c=|warm-up|server ready|speedup|Traceback|RuntimeError)"
  # the engine core's steps in each level's and mode's window (bench.agentic's window_s)
  python3 "$ROOT/scripts/step_log_summary.py" $steps --windows "$OUT/agentic_$tag.json" | tee "$OUT/agentic_steps_$tag.txt"
}

profile() {  # shape api_processes concurrency [seconds]: where the server's host time goes under load
  local shape=$1 port=8010 secs=${4:-15} tag=profile_$1_ap$2_c$3
  python3 -m pie_server.app.cli serve --model $M/$shape --device "${DEVICE:-cuda}" --port $port \
    --served-model-name "$shape" --default-inferlet "$WASM" --log-level warning --api-processes "$2" \
    > "$OUT/serve_$tag.log" 2>&1 &
  local pid=$!
  wait_health $port $pid || { tail -30 "$OUT/serve_$tag.log"; return 1; }
  timeout $((secs + 90)) python3 bench/http_load.py --url "http://127.0.0.1:$port" --model "$shape" \
    --concurrency "$3" --requests-per-level $(($3 * 16)) --max-tokens 512 --json "$OUT/$tag.json" \
    > "$OUT/$tag.load.log" 2>&1 &
  local load=$!
  sleep "${PROFILE_WARMUP_S:-8}"  # past the first requests' prefills: steady decoding
  # Blocking sampling (each sample stops the process briefly): --nonblocking misattributed leaves on the CPU
  # machine (a 0.4 us tokenizer check took a fifth of a thread's samples).
  /tmp/site/bin/py-spy record --pid $pid --subprocesses --threads --rate 100 --duration "$secs" \
    --format raw -o "$OUT/$tag.raw" > "$OUT/$tag.pyspy.log" 2>&1 || tail -3 "$OUT/$tag.pyspy.log"
  python3 scripts/profile_summary.py "$OUT/$tag.raw" --top 40 > "$OUT/$tag.txt" && head -50 "$OUT/$tag.txt"
  kill $load $pid 2>/dev/null; wait $load $pid 2>/dev/null
  sleep 2
}

agentic_profile() {  # shape concurrency [seconds]: where the agents' time goes (both modes run, the inferlet first;
                    # AGENTIC_MODES="client inferlet": the client first, into agentic_profile_SHAPE_cC_client_inferlet.*)
  [ -f $M/$1/model.safetensors ] || make_models > /dev/null
  local tag=agentic_profile_$1_c$2${AGENTIC_MODES:+_${AGENTIC_MODES// /_}}
  python3 -m bench.agentic --model $M/$1 --device cuda --tasks-per-agent 4 --concurrency "$2" \
    ${AGENTIC_MODES:+--modes $AGENTIC_MODES} > "$OUT/$tag.log" 2>&1 &
  local bench=$!
  sleep "${PROFILE_WARMUP_S:-35}"
  /tmp/site/bin/py-spy record --pid $bench --subprocesses --threads --rate 100 --duration "${3:-20}" \
    --format raw -o "$OUT/$tag.raw" > "$OUT/$tag.pyspy.log" 2>&1 || tail -3 "$OUT/$tag.pyspy.log"
  python3 scripts/profile_summary.py "$OUT/$tag.raw" --top 40 > "$OUT/$tag.txt" && grep -E "==|thread" "$OUT/$tag.txt"
  wait $bench; grep -E "^(c=|speedup)" "$OUT/$tag.log"
}

offline() {  # shape: the executor's offline throughput, as vLLM's offline.py measures its own (OFFLINE_ARGS: more
             # bench.gpu_throughput arguments, e.g. "--token-budget 16384"; OFFLINE_TAG: a suffix of the result files)
  local tag=offline_$1${OFFLINE_TAG:-}
  timeout 500 python3 -m bench.gpu_throughput --shapes "$1" --hf-requests 0 ${OFFLINE_ARGS:-} 2>&1 \
    | grep -v "^pie_server\|^INFO" | tail -6 | tee "$OUT/$tag.txt"
  cp bench/results/gpu_throughput.json "$OUT/$tag.json" 2>/dev/null
}

decode() {  # shape context: decode TPOT next to the memory-bandwidth floor (vLLM's batch 64: 512-token prompts)
  timeout 400 python3 -m bench.gpu_decode --shapes "$1" --batches 1 16 64 --context "$2" 2>&1 | tail -8 \
    | tee "$OUT/decode_$1_ctx$2.txt"
  cp bench/results/gpu_decode.json "$OUT/decode_$1_ctx$2.json" 2>/dev/null
}

vllm_offline() {  # shape (vLLM's own environment, in a subshell)
  (source /tmp/vllm-env.sh && OUT=$OUT timeout 550 python3 $C/.gpu-model/vllm-offline.py "$1" 2>&1 \
    | grep -v "^INFO\|^(EngineCore\|^WARNING\|^\[" | tail -4 | tee "$OUT/vllm_offline_$1.txt")
}

tax_profile() {  # shape batch: py-spy over bench/programmability_tax.py at one batch (both paths, the core's process
                # too; 256 tokens, 30 repeats), attached after PROFILE_WARMUP_S (45 s: imports, graph capture and
                # the first repeats) for 15 s at 100 Hz: where the default inferlet's steady decode loses to the direct
                # one. From the start at 200 Hz (before 2026-12-07) py-spy fell 7 s behind and saw only the start-up.
  local tag=tax_profile_$1_b$2
  python3 bench/programmability_tax.py --model $M/$1 --device cuda --batch "$2" --max-tokens 256 --repeats 30 \
    --num-pages 2048 --api-processes 1 --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1 &
  local bench=$!
  sleep "${PROFILE_WARMUP_S:-45}"
  /tmp/site/bin/py-spy record --pid $bench --subprocesses --threads --rate 100 --duration 15 \
    --format raw -o "$OUT/$tag.raw" > "$OUT/$tag.pyspy.log" 2>&1 || tail -3 "$OUT/$tag.pyspy.log"
  wait $bench; grep "^batch" "$OUT/$tag.log"
  python3 scripts/profile_summary.py "$OUT/$tag.raw" --top 40 > "$OUT/$tag.txt" && grep -E "==|thread" "$OUT/$tag.txt"
}

tax_steps() {  # shape batch: the tax bench at one batch (256 tokens, 3 repeats) with the engine core's step log: how
                # its loop splits a step (form / submit / wait / deliver; the loop's cycles, --cycles), $OUT/tax_steps_SHAPE_bB${tax_tag}.{log,txt,jsonl.gz}
  local tag=tax_steps_$1_b$2${tax_tag:-}
  PIE_STEP_LOG=$OUT/$tag.jsonl timeout 300 python3 bench/programmability_tax.py --model $M/$1 --device cuda --batch "$2" \
    --max-tokens 256 --repeats 3 --num-pages 2048 --api-processes 1 > "$OUT/$tag.log" 2>&1
  grep "^batch" "$OUT/$tag.log"
  python3 scripts/step_log_summary.py "$OUT/$tag.jsonl" --cycles | tee "$OUT/$tag.txt"; gzip -f "$OUT/$tag.jsonl"
}

tax() {  # shape api_processes
  timeout 400 python3 bench/programmability_tax.py --model $M/$1 --device cuda --batch 1 8 32 64 --max-tokens 64 \
    --repeats "${TAX_REPEATS:-3}" --num-pages 2048 --api-processes "$2" --json "$OUT/tax_$1_ap$2${tax_tag:-}.json" 2>&1 \
    | grep "^batch"
}

env_setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
while [ $# -gt 0 ]; do
  case $1 in
    setup) make_models
           timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/control/test_pipeline_gpu.py 2>&1 | tail -3
           shift ;;
    pie) pie_http "$2" "${3:-1}"; shift 3 ;;
    base-pie) base_site; PYTHONPATH=/tmp/sitebase:$PYTHONPATH PIE_TAG=${BASE_TAG:-pie_base} pie_http "$2" "${3:-1}"; shift 3 ;;
    models) make_models; shift ;;
    tax) tax "$2" "${3:-0}"; shift 3 ;;
    tax-profile) tax_profile "$2" "$3"; shift 3 ;;
    tax-steps) tax_steps "$2" "$3"; shift 3 ;;
    base-tax-steps) base_site; (export PYTHONPATH=/tmp/sitebase:$PYTHONPATH; tax_tag=_base tax_steps "$2" "$3"); shift 3 ;;
    base-tax) base_site; (export PYTHONPATH=/tmp/sitebase:$PYTHONPATH; tax_tag=_base tax "$2" "${3:-0}"); shift 3 ;;
    profile) if [[ ${5:-} =~ ^[0-9]+$ ]]; then profile "$2" "$3" "$4" "$5"; shift 5
             else profile "$2" "$3" "$4" 15; shift 4; fi ;;
    agentic) shift; agentic "$@"; shift $# ;;
    base-agentic) shift; base_site; (cd /tmp/base && PYTHONPATH=/tmp/sitebase:$PYTHONPATH AGENTIC_TAG=_base agentic "$@")
                  shift $# ;;
    agentic-profile) if [[ ${4:-} =~ ^[0-9]+$ ]]; then agentic_profile "$2" "$3" "$4"; shift 4
                     else agentic_profile "$2" "$3" 20; shift 3; fi ;;
    vllm) vllm_http "$2"; shift 2 ;;
    vllm-offline) vllm_offline "$2"; shift 2 ;;
    offline) offline "$2"; shift 2 ;;
    decode) decode "$2" "$3"; shift 3 ;;
    tp) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/engine/model/test_tensor_parallel.py 2>&1 \
          | tail -20 | tee "$OUT/tp_test.log"; shift ;;
    tp-bench) shift; timeout 560 python3 -m bench.tp_decode "$@" 2>&1 | tee -a "$OUT/tp_bench.log"
              cp bench/results/tp_decode.json "$OUT/" 2>/dev/null; shift $# ;;
    breakdown) breakdown "$2" "$3" "$ROOT"; shift 3 ;;
    base-breakdown) base_site; PYTHONPATH=/tmp/sitebase:$PYTHONPATH breakdown "$2" "base_$3" /tmp/base; shift 3 ;;
    mixed) timeout 300 python3 -m bench.gpu_mixed_steps --shapes "$2" 2>&1 | tail -16 | tee "$OUT/mixed_steps_$2.txt"
           shift 2 ;;
    grammar-masks) timeout 200 python3 -m bench.grammar_masks --model $M/$2 2>&1 | tee "$OUT/grammar_masks_$2.txt"; shift 2 ;;
    gpu-test) timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider -rs "$2" 2>&1 | tail -15 \
                | tee -a "$OUT/gpu_test.log"; shift 2 ;;
    # test_schemathesis.py imports schemathesis, which is not carried (it has no GPU tests)
    gpu-tests) timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider -rs --ignore=tests/app/test_schemathesis.py \
                 tests 2>&1 | tail -25 \
                 | tee "$OUT/gpu_tests.log"; shift ;;
    *) echo "unknown command $1"; exit 2 ;;
  esac
  stamp "done: rc=$?"
done

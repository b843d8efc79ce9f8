#!/usr/bin/env bash
# The GPU pass of issue 11, run on a lent CUDA machine from the repo root (wheels for what it lacks in .whl/).
# Two parts, each one device call of under ten minutes; every step has its own time box, so a step that
# hangs or fails costs only its box and the next still runs. Results and logs land in $OUT (or /tmp/gpu-out).
#   PART=a  the AR benchmark (Qwen2.5-0.5B shape, 64 and 256 streams x 128 tokens, 128-token prompts) against
#           transformers serve --continuous-batching, the SD-1.5-shaped diffusion benchmark (served vs raw vs
#           diffusers serial), and decode step time against the weight-bandwidth limit (Qwen2.5-0.5B and
#           TinyLlama-1.1B shapes; CUDA graphs, eager flex attention, and the gathering torch attention)
#   PART=b  the whole test suite on CUDA (servers start with --device auto = cuda; the CUDA-path tests of flex
#           attention and decode graphs among them), pytest-xdist across the cores, then the AR benchmark at
#           the TinyLlama-1.1B shape
#   PART=ab both, one after the other
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" .bench/logs
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}  # the whole command's time; a step gets at most what is left of it
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
# step NAME LOG MAX_S TAIL command...: runs the command under min(MAX_S, time left), its output to $OUT/LOG
step() {
  local name=$1 log=$2 max_s=$3 tail_lines=$4; shift 4
  local left=$(( BUDGET_S - ($(date +%s) - START) - 5 ))
  local box=$(( max_s < left ? max_s : left ))
  if [ "$box" -lt 20 ]; then echo "== $name: skipped, ${left}s left"; return; fi
  echo "== $name (box ${box}s, at $(( $(date +%s) - START ))s)"
  timeout -k 5 "$box" "$@" > "$OUT/$log" 2>&1
  echo "   rc $? after $(( $(date +%s) - START ))s"
  grep -v -e "Loading" -e "Writing model" -e "it/s]" "$OUT/$log" | tail -"$tail_lines"
}
PART=${PART:-a}
if [[ "$PART" == *a* ]]; then
  # the AR server compiles flex attention for its decode batch sizes first; decode_step, later, reuses what
  # inductor cached for the same shapes
  step "AR: Qwen2.5-0.5B shape, genserve vs transformers serve" bench_ar_qwen.log 240 40 \
    python3 -m loadtest.benchmarks.bench_ar --device cuda --shape qwen2.5-0.5b \
    --systems genserve,genserve-prefill-4096,transformers-serve \
    --concurrency 64,256 --requests "${AR_REQUESTS:-256}" --warmup 64 --max-tokens 128 --prompt-len 66 --repeats 1 \
    --hf-cb-num-blocks 0 --hf-cb-max-batch-tokens 0 --genserve-kv-cache-tokens 262144 --startup-timeout 170 \
    --json-out "$OUT/bench_ar_qwen2.5-0.5b_cuda.json"
  cp .bench/logs/genserve.log "$OUT/genserve_ar.log" 2>/dev/null
  step "diffusion: SD-1.5 shape, served vs raw vs diffusers serial" bench_sd.log 150 16 \
    python3 -m loadtest.benchmarks.bench_sd --device cuda --systems served,raw,serial --requests 48 \
    --serial-requests 8 --json-out "$OUT/bench_sd15_cuda.json"
  cp .bench/logs/genserve-sd.log "$OUT/genserve_sd.log" 2>/dev/null
  [ -n "${SKIP_DECODE:-}" ] || step "decode step time vs the weight-bandwidth limit" decode_step.log 160 30 \
    python3 -m loadtest.benchmarks.decode_step --shapes qwen2.5-0.5b,tinyllama-1.1b --batch-sizes 1,8,32,64 \
    --json-out "$OUT/decode_step_cuda.json"
fi
if [[ "$PART" == *b* ]]; then
  # --dist loadfile: a module's tests share one server and some rely on their order (test_supervision.py).
  # tests/deploy drives Prometheus, Chromium, hadolint and kubectl, none of which this machine has, and none
  # touches CUDA; schemathesis is not installed here either
  step "the whole suite on CUDA" pytest_all.log 330 25 \
    python3 -m pytest -q -p no:cacheprovider -rs -n "${WORKERS:-12}" --dist loadfile --continue-on-collection-errors \
    --ignore=tests/deploy --deselect tests/integration/test_hardening.py::test_schemathesis_finds_no_server_error \
    ${TESTS:-tests}
  step "AR: TinyLlama-1.1B shape, genserve vs transformers serve" bench_ar_tinyllama.log 200 40 \
    python3 -m loadtest.benchmarks.bench_ar --device cuda --shape tinyllama-1.1b --systems genserve,transformers-serve \
    --concurrency 64,256 --requests "${AR_REQUESTS:-256}" --warmup 64 --max-tokens 128 --prompt-len 66 --repeats 1 \
    --hf-cb-num-blocks 0 --hf-cb-max-batch-tokens 0 --genserve-kv-cache-tokens 262144 --startup-timeout 170 \
    --json-out "$OUT/bench_ar_tinyllama-1.1b_cuda.json"
fi
echo "== done after $(( $(date +%s) - START ))s"

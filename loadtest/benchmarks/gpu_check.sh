#!/usr/bin/env bash
# The GPU pass, run on a lent CUDA machine from the repo root (wheels for what it lacks in .whl/):
# first issue 11's CUDA path (flex attention reading the KV pool in place, decode CUDA graphs: their tests,
# then the decode step time against the weight-bandwidth limit), then every test (the HTTP tests with the
# server on CUDA) and the AR, diffusion and mixed benchmarks on CUDA.
# PART=cuda-path stops after the first part; PART=cuda-tests or PART=decode-bench runs only that half of it
# (each fits one 10-minute command). Results land in $OUT (or /tmp/gpu-out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
step() { echo "== $1"; shift; "$@" 2>&1 | tee "$OUT/$LOG" | tail -"$TAIL"; }
PART=${PART:-all}
if [ "$PART" != decode-bench ]; then
  LOG=pytest_cuda_path.log TAIL=8 step "flex attention and decode CUDA graphs: tests" \
    timeout 360 python3 -m pytest -q -p no:cacheprovider -rs tests/unit/test_ar_engine_cuda.py \
    tests/unit/test_flex_attention.py tests/unit/test_ar_models.py
fi
if [ "$PART" != cuda-tests ]; then
  for shape in qwen2.5-0.5b tinyllama-1.1b; do
    LOG=decode_step_$shape.log TAIL=12 step "decode step time vs the weight-bandwidth limit, $shape" \
      timeout 270 python3 -m loadtest.benchmarks.decode_step --shapes "$shape" --batch-sizes 1,8,32,64 \
      --json-out "$OUT/decode_step_cuda_$shape.json"
  done
fi
case "$PART" in cuda-path|cuda-tests|decode-bench) exit 0 ;; esac
LOG=pytest_all.log TAIL=6 step "all tests (servers use --device auto = cuda)" \
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests}
python3 -m loadtest.benchmarks.make_bench_model > /dev/null 2>&1
LOG=bench_ar.log TAIL=12 step "AR benchmark on cuda" \
  timeout 150 python3 -m loadtest.benchmarks.bench_ar --systems genserve,raw --device cuda --threads 0 --requests 320 \
  --repeats 2 --json-out "$OUT/bench_ar_cuda.json"
LOG=bench_diffusion.log TAIL=14 step "diffusion benchmark on cuda" \
  timeout 200 python3 -m loadtest.benchmarks.bench_diffusion --device cuda --threads 0 --repeats 2 \
  --json-out "$OUT/bench_diffusion_cuda.json"
LOG=bench_mixed.log TAIL=8 step "AR latency beside a diffusion batch, cuda" \
  timeout 120 python3 -m loadtest.benchmarks.bench_mixed --device cuda --json-out "$OUT/bench_mixed_cuda.json"

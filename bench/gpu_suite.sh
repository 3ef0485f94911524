#!/usr/bin/env bash
# One command for a CUDA machine with no network: install the checkout (never `make`, never a torch
# install), run the GPU tests, then every benchmark part in bench/suite.d/ (each within its own time
# slice), writing result files under bench/results/. The slices add up to 565 s (tests 150, kernels 195,
# sampler 110, trainer 110), so the whole suite stays under ten minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=bench/results
mkdir -p "$OUT"
export FASTMATH_BENCH_OUT="$OUT"

$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
$PY -m fastmath.cli info | tee "$OUT/gpu_info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu_info.txt" || true

status=0
# GPU tests: the kernel tests on CUDA tensors (no interpreter; 120 s), then every other test that has
# a CUDA case (test ids containing "cuda"; 30 s).
unset TRITON_INTERPRET FASTMATH_KERNELS
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
timeout 30 $PY -m pytest -q -p no:cacheprovider tests --ignore=tests/kernels -k cuda 2>&1 | tee -a "$OUT/gpu_tests.txt" || status=1

# Benchmark parts: bench/suite.d/NN-name.sh, run in order; each part states its own time slice.
for part in bench/suite.d/*.sh; do
  [ -e "$part" ] || continue
  echo "== $part"
  bash "$part" || { echo "part failed: $part"; status=1; }
done
exit $status

#!/usr/bin/env bash
# Kernel benchmarks on the GPU (time slice: 195 s in all). Each script stops starting new shapes
# after --budget-s and is killed at its timeout; it rewrites its results after every measurement, so a
# cut-short run keeps what it measured. Writes $FASTMATH_BENCH_OUT/{rms_norm,rotary,swiglu,cross_entropy,
# fused_linear_cross_entropy}.{json,md} and <name>.txt logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export FASTMATH_BENCH_OUT=${FASTMATH_BENCH_OUT:-bench/results}
mkdir -p "$FASTMATH_BENCH_OUT"
unset FASTMATH_KERNELS  # the Triton path must be on
status=0
#        script                          timeout  budget (seconds)
for spec in "rms_norm 40 22" "rotary 40 22" "swiglu 35 18" "cross_entropy 35 18" "fused_linear_cross_entropy 45 28"; do
  set -- $spec
  echo "== bench_$1 (slice $2 s)"
  timeout "$2" $PY "bench/bench_$1.py" --budget-s "$3" 2>&1 | tee "$FASTMATH_BENCH_OUT/$1.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "bench_$1 exited with $rc (124 = time slice reached; partial results kept)"; status=1; }
done
exit $status

#!/usr/bin/env bash
# Sampler on the GPU (time slice: 110 s): LLaMA-2-7B-shaped model with random bf16 weights, 256 samples
# for each of 2 prompts, 256 new tokens each: tokens/s, samples/s, fraction of the memory-bandwidth roofline
# per decode step, and the largest number of concurrent sequences (512 new tokens) the card holds.
# Writes $FASTMATH_BENCH_OUT/sampler_gpu.json.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export FASTMATH_BENCH_OUT=${FASTMATH_BENCH_OUT:-bench/results}
mkdir -p "$FASTMATH_BENCH_OUT"
timeout 110 $PY bench/sampler.py --gpu 2>&1 | tee "$FASTMATH_BENCH_OUT/sampler_gpu.txt"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Trainer on the GPU (time slice: 110 s): useful tokens/s of fastmath's packed training step vs
# Hugging Face LlamaForCausalLM (sdpa, padded batches random and length-grouped) on GSM8K-like documents,
# then MFU of a ~1B-parameter LLaMA (dim 2048, 16 layers) for kernels on/off and each attention backend,
# against 989 TFLOP/s and against the measured bf16 matmul peak.
# Writes $FASTMATH_BENCH_OUT/train_step_cuda.{json,md} and train_step_cuda.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export FASTMATH_BENCH_OUT=${FASTMATH_BENCH_OUT:-bench/results}
mkdir -p "$FASTMATH_BENCH_OUT"
unset FASTMATH_KERNELS FASTMATH_ATTENTION
timeout 110 $PY bench/train_step.py --device cuda --dim 1024 --layers 8 --heads 16 --budget 16384 --steps 8 \
  --mfu --budget-s 80 2>&1 | tee "$FASTMATH_BENCH_OUT/train_step_cuda.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "bench/train_step.py exited with $rc (124 = time slice reached)"; exit 1; }

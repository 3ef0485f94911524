"""Benchmark the output head + loss (bf16, V 32000, "mean", 10% ignored labels): fastmath's fused linear
cross-entropy vs PyTorch eager F.cross_entropy(F.linear(h, W).float(), y), torch.compile and Liger-Kernel.
Compute-bound: reports TFLOP/s (6 N H V per forward+backward) and peak memory above the inputs. Writes
fused_linear_cross_entropy.json / .md under $FASTMATH_BENCH_OUT."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels_common as common  # noqa: E402
from kernels_common import (Benchmark, Case, compiled, find_row, liger_function, liger_targets,  # noqa: E402
                            parse_args, run, setup)

VOCAB = 32000
SHAPES = [(16384, 4096), (16384, 5120), (16384, 8192), (4096, 4096), (1024, 4096)]  # (tokens, hidden)
SMOKE_SHAPES = [(64, 64), (5, 32)]  # --smoke: CPU, Triton interpreter
TARGET_CASE = "N=16384 H=4096"


def make_case(n, h):
    def make():
        hidden = torch.randn(n, h, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(VOCAB, h, device=common.DEVICE) * 0.02).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, VOCAB, (n,), device=common.DEVICE)
        labels[torch.rand(n, device=common.DEVICE) < 0.1] = -100
        return {"hidden": hidden, "weight": weight, "labels": labels}, None

    return Case(f"N={n} H={h}", {"tokens": n, "hidden": h, "vocab": VOCAB, "dtype": "bf16"}, make,
                flops_fwd=2 * n * h * VOCAB, flops_bwd=4 * n * h * VOCAB)


def eager(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def targets(rows):
    ours, base = find_row(rows, TARGET_CASE, "fastmath"), find_row(rows, TARGET_CASE, "eager")
    if not (ours and base) or ours["peak_mem_above_inputs_MB"] is None:
        return [f"{TARGET_CASE}: not measured"] + liger_targets(rows)
    mem = ours["peak_mem_above_inputs_MB"] / base["peak_mem_above_inputs_MB"]
    time = ours["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return [f"{TARGET_CASE}: peak memory above inputs {100 * mem:.0f}% of eager ({'met' if mem <= 0.25 else 'NOT met'}: <= 25%)",
            f"{TARGET_CASE}: fwd+bwd time {time:.2f}x eager ({'met' if time <= 1.1 else 'NOT met'}: <= 1.1x)"
            ] + liger_targets(rows)


def main():
    args = parse_args(__doc__, default_budget_s=35)
    setup(args, "bench_fused_linear_cross_entropy")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    from fastmath.kernels import fused_linear_cross_entropy

    providers = {"eager": eager, "fastmath": fused_linear_cross_entropy}
    liger = liger_function("liger_fused_linear_cross_entropy")
    if liger is not None:
        providers["liger"] = lambda hidden, weight, labels: liger(hidden, weight, labels)
    providers["torch.compile"] = compiled(eager)
    bench = Benchmark(
        "fused_linear_cross_entropy", "Fused linear cross-entropy (output head + loss), bf16", providers,
        [make_case(n, h) for n, h in shapes], targets=targets,
        notes=["Peak memory above the inputs includes the gradients of hidden and weight.",
               "fastmath and Liger finish the gradients during forward, so their 'fwd' includes them."],
    )
    run(bench, args)


if __name__ == "__main__":
    main()

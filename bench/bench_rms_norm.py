"""Benchmark RMSNorm (bf16, LLaMA-2 hidden sizes): fastmath vs PyTorch eager (HF LlamaRMSNorm casting),
torch.compile and Liger-Kernel. Writes rms_norm.json / rms_norm.md under $FASTMATH_BENCH_OUT."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import kernels_common as common  # noqa: E402
from kernels_common import (Benchmark, Case, bandwidth_targets, compiled, liger_function, liger_targets,  # noqa: E402
                            parse_args, run, setup)

EPS = 1e-5
SHAPES = [(16384, 4096), (16384, 5120), (16384, 8192), (4096, 4096), (1024, 4096)]  # (tokens, hidden)
SMOKE_SHAPES = [(64, 256), (5, 123)]  # --smoke: CPU, Triton interpreter


def make_case(n, h):
    def make():
        x = torch.randn(n, h, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(h, device=common.DEVICE)).to(torch.bfloat16).requires_grad_()
        return {"x": x, "w": w}, torch.randn_like(x)

    e = 2  # bytes per bf16 element
    return Case(f"N={n} H={h}", {"tokens": n, "hidden": h, "dtype": "bf16"}, make,
                bytes_fwd=2 * n * h * e + h * e, bytes_bwd=3 * n * h * e + h * e)


def main():
    args = parse_args(__doc__, default_budget_s=30)
    setup(args, "bench_rms_norm")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    from fastmath.kernels import rms_norm, rms_norm_ref

    providers = {"eager": lambda x, w: rms_norm_ref(x, w, EPS), "fastmath": lambda x, w: rms_norm(x, w, EPS)}
    liger = liger_function("liger_rms_norm")
    if liger is not None:
        providers["liger"] = lambda x, w: liger(x, w, EPS)
    providers["torch.compile"] = compiled(lambda x, w: rms_norm_ref(x, w, EPS))
    bench = Benchmark(
        "rms_norm", "RMSNorm forward/backward, bf16", providers, [make_case(n, h) for n, h in shapes],
        targets=lambda rows: bandwidth_targets(rows, "N=16384 H=4096") + liger_targets(rows),
        notes=["GB/s counts the minimal traffic: forward reads x and writes y, backward reads dy and x and writes dx."],
    )
    run(bench, args)


if __name__ == "__main__":
    main()

"""Benchmark SwiGLU silu(gate) * up (bf16, LLaMA-2 intermediate sizes): fastmath vs PyTorch eager
(HF LlamaMLP: F.silu(gate) * up in bf16), torch.compile and Liger-Kernel. Writes swiglu.json / swiglu.md
under $FASTMATH_BENCH_OUT."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels_common as common  # noqa: E402
from kernels_common import (Benchmark, Case, compiled, liger_function, liger_targets, parse_args,  # noqa: E402
                            run, setup)

SHAPES = [(16384, 11008), (4096, 11008), (16384, 13824), (8192, 28672)]  # (tokens, intermediate size)
SMOKE_SHAPES = [(64, 688), (3, 7)]  # --smoke: CPU, Triton interpreter


def make_case(n, i):
    def make():
        gate = torch.randn(n, i, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(n, i, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        return {"gate": gate, "up": up}, torch.randn_like(gate)

    e = 2
    return Case(f"N={n} I={i}", {"tokens": n, "intermediate": i, "dtype": "bf16"}, make,
                bytes_fwd=3 * n * i * e, bytes_bwd=5 * n * i * e)


def eager(gate, up):
    return F.silu(gate) * up


def main():
    args = parse_args(__doc__, default_budget_s=25)
    setup(args, "bench_swiglu")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    from fastmath.kernels import swiglu

    providers = {"eager": eager, "fastmath": swiglu}
    liger = liger_function("liger_swiglu")
    if liger is not None:
        providers["liger"] = lambda gate, up: liger(gate, up)  # positional: Liger names them (a, b)
    providers["torch.compile"] = compiled(eager)
    bench = Benchmark(
        "swiglu", "SwiGLU forward/backward, bf16", providers, [make_case(n, i) for n, i in shapes],
        targets=liger_targets,
        notes=["GB/s counts the minimal traffic: forward reads gate, up and writes out; backward reads dy, gate, up "
               "and writes dgate, dup."],
    )
    run(bench, args)


if __name__ == "__main__":
    main()

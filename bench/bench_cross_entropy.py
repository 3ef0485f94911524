"""Benchmark cross-entropy over bf16 logits (V 32000, 10% ignored labels, "mean"): fastmath vs PyTorch
eager F.cross_entropy(logits.float(), y), torch.compile and Liger-Kernel. Writes cross_entropy.json /
cross_entropy.md under $FASTMATH_BENCH_OUT."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels_common as common  # noqa: E402
from kernels_common import (Benchmark, Case, compiled, liger_function, liger_targets, parse_args,  # noqa: E402
                            run, setup)

VOCAB = 32000
SHAPES = [16384, 4096, 1024]  # tokens
SMOKE_SHAPES = [64, 5]  # --smoke: CPU, Triton interpreter


def make_case(n):
    def make():
        logits = torch.randn(n, VOCAB, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, VOCAB, (n,), device=common.DEVICE)
        labels[torch.rand(n, device=common.DEVICE) < 0.1] = -100
        return {"logits": logits, "labels": labels}, None

    e = 2
    return Case(f"N={n} V={VOCAB}", {"tokens": n, "vocab": VOCAB, "dtype": "bf16"}, make,
                bytes_fwd=n * VOCAB * e, bytes_bwd=n * VOCAB * e)


def eager(logits, labels):
    return F.cross_entropy(logits.float(), labels)


def main():
    args = parse_args(__doc__, default_budget_s=25)
    setup(args, "bench_cross_entropy")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    from fastmath.kernels import cross_entropy

    providers = {"eager": eager, "fastmath": cross_entropy}
    liger = liger_function("liger_cross_entropy")
    if liger is not None:
        providers["liger"] = lambda logits, labels: liger(logits, labels)
    providers["torch.compile"] = compiled(eager)
    bench = Benchmark(
        "cross_entropy", "Cross-entropy forward/backward, bf16 logits", providers, [make_case(n) for n in shapes],
        targets=liger_targets,
        notes=["GB/s counts reading the logits once and writing their gradient once (forward+backward).",
               "fastmath and Liger compute the gradient during forward, so their 'fwd' includes it."],
    )
    run(bench, args)


if __name__ == "__main__":
    main()

"""Benchmark rotary embeddings on q and k (bf16, LLaMA-2 head layouts): fastmath vs PyTorch eager (HF
rotate_half with cos/sin from the positions), torch.compile and Liger-Kernel (given precomputed cos/sin,
its interface). Writes rotary.json / rotary.md under $FASTMATH_BENCH_OUT."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import kernels_common as common  # noqa: E402
from kernels_common import (Benchmark, Case, bandwidth_targets, compiled, liger_function, liger_targets,  # noqa: E402
                            parse_args, run, setup)

HEAD_DIM = 128
# (tokens, q heads, kv heads): 7B and 13B are multi-head, 70B uses 8 KV heads
SHAPES = [(16384, 32, 32), (4096, 32, 32), (1024, 32, 32), (16384, 40, 40), (16384, 64, 8)]
SMOKE_SHAPES = [(32, 4, 4), (9, 8, 2)]  # --smoke: CPU, Triton interpreter


def make_case(t, hq, hk):
    def make():
        from fastmath.kernels import rotary_cos_sin

        q = torch.randn(t, hq, HEAD_DIM, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(t, hk, HEAD_DIM, device=common.DEVICE, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(t, device=common.DEVICE) % 4096  # packed 4096-token documents
        cos, sin = rotary_cos_sin(positions, HEAD_DIM)  # for Liger only: (T, D) fp32
        inputs = {"q": q, "k": k, "positions": positions, "cos": cos[None].bfloat16(), "sin": sin[None].bfloat16()}
        return inputs, (torch.randn_like(q), torch.randn_like(k))

    qk_bytes = t * (hq + hk) * HEAD_DIM * 2
    return Case(f"T={t} heads={hq}/{hk}", {"tokens": t, "q_heads": hq, "kv_heads": hk, "head_dim": HEAD_DIM,
                                           "dtype": "bf16"}, make, bytes_fwd=2 * qk_bytes, bytes_bwd=2 * qk_bytes)


def main():
    args = parse_args(__doc__, default_budget_s=30)
    setup(args, "bench_rotary")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    from fastmath.kernels import apply_rotary, apply_rotary_ref

    providers = {
        "eager": lambda q, k, positions, cos, sin: apply_rotary_ref(q, k, positions),
        "fastmath": lambda q, k, positions, cos, sin: apply_rotary(q, k, positions),
    }
    liger = liger_function("liger_rope")
    if liger is not None:
        def liger_rope(q, k, positions, cos, sin):
            # Liger takes HF's (B, heads, T, D) views; hand it those views of our (T, heads, D) tensors.
            q_out, k_out = liger(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos, sin)
            return q_out.transpose(1, 2).squeeze(0), k_out.transpose(1, 2).squeeze(0)

        providers["liger"] = liger_rope
    providers["torch.compile"] = compiled(lambda q, k, positions, cos, sin: apply_rotary_ref(q, k, positions))
    bench = Benchmark(
        "rotary", "Rotary embedding of q and k, forward/backward, bf16", providers,
        [make_case(*s) for s in shapes],
        targets=lambda rows: bandwidth_targets(rows, "T=16384 heads=32/32") + liger_targets(rows),
        notes=["GB/s counts reading and writing q and k once per pass.",
               "fastmath and eager derive cos/sin from the positions inside the call; Liger gets them precomputed "
               "(bf16, shared by all layers in a model), so its time excludes that step.",
               "Liger rotates q and k in place (it returns views of its inputs); fastmath and eager write new tensors."],
    )
    run(bench, args)


if __name__ == "__main__":
    main()

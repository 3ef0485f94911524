"""Training-step throughput: useful (non-padding) tokens/s of fastmath's packed step vs Hugging Face
LlamaForCausalLM (attn_implementation="sdpa") with padded batches, both random and length-grouped, on the
same documents, same model dims and the same optimizer; on a GPU also MFU of a ~1B-parameter LLaMA for
kernels on/off and each available attention backend.

Documents: GSM8K train (prompt + answer with the LLaMA-2 tokenizer) when ../shared/data is present,
else lengths drawn to match its spread (log-normal, median ~190 tokens). One step of each method
processes about the same number of useful tokens (`--budget`): fastmath packs documents best-fit into
micro-batches of `--budget` tokens; HF takes `budget / mean length` documents per padded batch.

    python bench/train_step.py                      # CPU part (the issue's target: >= 1.5x HF)
    python bench/train_step.py --device cuda --mfu  # GPU: the same comparison plus the MFU table
    python bench/train_step.py --mfu --smoke        # the GPU code (MFU table included) on the CPU, tiny
Writes $FASTMATH_BENCH_OUT/train_step_<device>.{json,md} (default bench/results); --smoke writes
train_step_smoke.{json,md} instead (never a real result file).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last, not first: the repo's kernels/ must not shadow the `kernels` package transformers imports

from fastmath import data as D  # noqa: E402
from fastmath.config import ModelArgs  # noqa: E402
from fastmath.model import Transformer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

# --smoke: the whole script (comparison and MFU table) on the CPU with tiny shapes; numbers meaningless.
# The vocabulary stays 32000: the synthetic documents draw token ids up to it.
SMOKE = dict(dim=64, layers=2, heads=4, budget=1024, steps=2, docs=200, mfu_dim=64, mfu_layers=2, mfu_heads=4,
             mfu_budget=1024, mfu_steps=2, matmul_n=256)


def gsm8k_docs(n: int, seed: int, synthetic: bool = False) -> tuple[D.TokenizedDocs, str]:
    """Tokenized GSM8K train documents (the real length spread), or synthetic ones with its statistics."""
    rng = np.random.default_rng(seed)
    if not synthetic and (SHARED / "gsm8k_train.jsonl").is_file() and (SHARED / "llama2_tokenizer.model").is_file():
        from fastmath.tokenizer import Tokenizer

        tok = Tokenizer(SHARED / "llama2_tokenizer.model")
        ex = D.read_examples(SHARED / "gsm8k_train.jsonl")
        ex = [ex[i] for i in rng.permutation(len(ex))[:n]]
        return D.tokenize_examples(ex, tok), "GSM8K train, LLaMA-2 tokenizer, Vicuna prompt"
    lengths = np.clip(rng.lognormal(np.log(190), 0.35, size=n), 60, 700).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(3, 32000, size=int(offsets[-1])).astype(np.int32)
    return D.TokenizedDocs(tokens, offsets, np.full(n, 60, np.int32), []), "synthetic GSM8K-like lengths"


def hf_batches(docs: D.TokenizedDocs, per_batch: int, grouped: bool, seed: int):
    """Padded (B, L) batches of `per_batch` documents: random order, or sorted by length then shuffled."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    if grouped:
        order = order[np.argsort(docs.lengths[order], kind="stable")]
    groups = [order[i:i + per_batch] for i in range(0, len(order) - per_batch + 1, per_batch)]
    if grouped:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    labels_all = D.flat_labels(docs)
    for g in groups:
        L = int(docs.lengths[g].max())
        ids = np.zeros((len(g), L), dtype=np.int64)
        mask = np.zeros((len(g), L), dtype=np.int64)
        labels = np.full((len(g), L), -100, dtype=np.int64)
        for r, d in enumerate(g):
            s, e = docs.offsets[d], docs.offsets[d + 1]
            ids[r, :e - s] = docs.tokens[s:e]
            mask[r, :e - s] = 1
            # HF shifts labels inside the loss: its label at t is our label at t-1 (the token itself)
            lab = labels_all[s:e]
            labels[r, 1:e - s] = lab[:-1]
        yield torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels), int(docs.lengths[g].sum())


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step_fn, batches, n_steps: int, warmup: int, device) -> dict:
    """Median seconds per step and useful tokens/s over n_steps (after warmup steps)."""
    times, useful = [], 0
    for i, b in enumerate(batches):
        if i >= warmup + n_steps:
            break
        _sync(device)
        t0 = time.perf_counter()
        n = step_fn(b)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            useful += n
    total = sum(times)
    return {"steps": len(times), "useful_tokens_per_s": useful / total, "median_step_s": statistics.median(times)}


def fastmath_step_fn(model, opt, device, bf16):
    def step(batch: D.PackedBatch):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss_sum, n = model(**batch.to_torch(device))
        (loss_sum / max(1, batch.n_targets)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(batch.tokens)
    return step


def hf_step_fn(model, opt, device, bf16):
    def step(b):
        ids, mask, labels, useful = b
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return useful
    return step


def hf_model(args: ModelArgs, state: dict, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.dim, intermediate_size=args.intermediate_size, num_hidden_layers=args.n_layers,
                      num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                      rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=4096,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg)
    m.load_state_dict({("lm_head." + k[8:] if k.startswith("lm_head.") else "model." + k): v for k, v in state.items()})
    return m.to(device).train()


def compare(args: ModelArgs, docs, budget: int, n_steps: int, device, bf16: bool, seed: int = 0) -> dict:
    """fastmath packed vs HF padded (random and length-grouped) on the same documents."""
    torch.manual_seed(seed)
    fm = Transformer(args).to(device).train()
    state = {k: v.detach().cpu().clone() for k, v in fm.state_dict().items()}
    fused = {"fused": True} if device.type == "cuda" else {}
    out = {}
    stream = D.PackedStream(docs, budget, seed=seed)
    packs = (D.make_batch(docs, stream.labels, p) for p in stream.epoch_packs(0))
    opt = torch.optim.AdamW(fm.parameters(), lr=1e-5, **fused)
    out["fastmath_packed"] = time_steps(fastmath_step_fn(fm, opt, device, bf16), packs, n_steps, 2, device)
    out["fastmath_packed"]["packing_efficiency"] = stream.efficiency()
    del fm, opt
    per_batch = max(1, int(round(budget / docs.lengths.mean())))
    for name, grouped in (("hf_sdpa_padded_random", False), ("hf_sdpa_padded_grouped", True)):
        hf = hf_model(args, state, device)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, **fused)
        batches = list(hf_batches(docs, per_batch, grouped, seed))
        pad_eff = sum(b[3] for b in batches) / sum(b[0].numel() for b in batches)
        out[name] = time_steps(hf_step_fn(hf, opt, device, bf16), iter(batches), n_steps, 2, device)
        out[name].update(sequences_per_batch=per_batch, padding_efficiency=pad_eff)
        del hf, opt
    best_hf = max(out["hf_sdpa_padded_random"]["useful_tokens_per_s"], out["hf_sdpa_padded_grouped"]["useful_tokens_per_s"])
    out["speedup_vs_best_hf"] = out["fastmath_packed"]["useful_tokens_per_s"] / best_hf
    return out


def measured_matmul_peak(device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def mfu_table(docs, budget: int, n_steps: int, device, deadline: float, smoke: bool = False) -> list[dict]:
    """MFU of a ~1B LLaMA (dim 2048, 16 layers, 16 heads, vocab 32000) per kernels on/off x attention backend.

    smoke: a tiny model (SMOKE) on whatever device is given (the CPU: fp32, no fused AdamW, no peak memory).
    """
    from fastmath.attention import available_backends
    from fastmath.train import flops_per_token

    cuda = device.type == "cuda"
    if smoke:
        args = ModelArgs(dim=SMOKE["mfu_dim"], n_layers=SMOKE["mfu_layers"], n_heads=SMOKE["mfu_heads"],
                         vocab_size=32000, max_seq_len=4096)
        peak_measured = measured_matmul_peak(device, SMOKE["matmul_n"])
    else:
        args = ModelArgs(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, max_seq_len=4096)
        peak_measured = measured_matmul_peak(device)
    rows = []
    torch.manual_seed(0)
    model = Transformer(args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if cuda else {}))
    stream = D.PackedStream(docs, budget, seed=0)
    packs = stream.epoch_packs(0)
    for backend in available_backends(device):
        for kernels in ("1", "0"):
            if time.time() > deadline:
                rows.append({"backend": backend, "kernels": kernels == "1", "skipped": "time budget reached"})
                continue
            os.environ["FASTMATH_ATTENTION"], os.environ["FASTMATH_KERNELS"] = backend, kernels
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)  # this row's peak, not the whole run's
            batches = (D.make_batch(docs, stream.labels, p) for p in packs)
            r = time_steps(fastmath_step_fn(model, opt, device, cuda), batches, n_steps, 3, device)
            b0 = D.make_batch(docs, stream.labels, packs[0])
            lens = np.diff(b0.cu_seqlens).astype(np.int64)
            fpt = flops_per_token(args, float((lens**2).sum() / lens.sum()))
            flops = fpt * r["useful_tokens_per_s"]
            rows.append({"backend": backend, "kernels": kernels == "1", **r, "params": args.num_params(),
                         "mfu_vs_989": flops / 989e12, "mfu_vs_measured": flops / peak_measured,
                         "measured_peak_tflops": peak_measured / 1e12,
                         "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None})
            print(json.dumps(rows[-1]), flush=True)
    os.environ.pop("FASTMATH_ATTENTION", None)
    os.environ.pop("FASTMATH_KERNELS", None)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dim", type=int, default=256, help="model width for the fastmath-vs-HF comparison")
    p.add_argument("--layers", type=int, default=4, help="layers for the comparison")
    p.add_argument("--heads", type=int, default=8, help="attention heads for the comparison")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (32000 = LLaMA-2's)")
    p.add_argument("--budget", type=int, default=4096, help="useful tokens per step (fastmath's pack budget)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per method (after 2 warm-up steps)")
    p.add_argument("--docs", type=int, default=2000, help="documents to draw from")
    p.add_argument("--mfu", action="store_true",
                   help="also the ~1B MFU table (CUDA only; its own 16384 tokens per step and 8 timed steps)")
    p.add_argument("--budget-s", type=float, default=120, help="stop starting new MFU rows after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script on the CPU: forces --device cpu and tiny shapes, budgets and steps "
                        "(overriding --dim/--layers/--heads/--budget/--steps/--docs), synthetic documents; with "
                        "--mfu also runs the MFU table on the CPU; numbers meaningless; writes "
                        "train_step_smoke.{json,md}, never a real result file")
    a = p.parse_args()
    t_start = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.smoke:
        a.device = "cpu"
        a.dim, a.layers, a.heads = SMOKE["dim"], SMOKE["layers"], SMOKE["heads"]
        a.budget, a.steps, a.docs = SMOKE["budget"], SMOKE["steps"], SMOKE["docs"]
    device = torch.device(a.device)
    bf16 = device.type == "cuda"
    docs, source = gsm8k_docs(a.docs, seed=0, synthetic=a.smoke)
    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, vocab_size=a.vocab, multiple_of=64)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": _device_name(device), "torch": torch.__version__,
              "python": platform.python_version(), "data": source, "doc_tokens_mean": float(docs.lengths.mean()),
              "doc_tokens_p10_p90": [int(np.percentile(docs.lengths, 10)), int(np.percentile(docs.lengths, 90))],
              "model": {"dim": a.dim, "layers": a.layers, "heads": a.heads, "vocab": a.vocab,
                        "params": args.num_params()},
              "budget_tokens": a.budget, "dtype": "bf16 autocast" if bf16 else "fp32",
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if a.smoke:
        result["smoke"] = True
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    result["comparison"] = compare(args, docs, a.budget, a.steps, device, bf16)
    print(json.dumps(result["comparison"], indent=1), flush=True)
    write(result, device, smoke=a.smoke)  # kept if the time slice kills the MFU table
    if a.mfu and a.smoke:
        result["mfu"] = mfu_table(docs, SMOKE["mfu_budget"], SMOKE["mfu_steps"], device, t_start + a.budget_s, smoke=True)
    elif a.mfu and device.type == "cuda":
        result["mfu"] = mfu_table(docs, 16384, 8, device, t_start + a.budget_s)
    write(result, device, smoke=a.smoke)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write(result: dict, device, smoke: bool = False) -> None:
    out = Path(os.environ.get("FASTMATH_BENCH_OUT", ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("train_step_smoke" if smoke else f"train_step_{device.type}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["comparison"]
    lines = [f"# Training step throughput ({result['device']}, {result['date']})"
             + (" - SMOKE RUN (tiny shapes on the CPU; numbers meaningless)" if smoke else ""), "",
             f"torch {result['torch']}, transformers {result.get('transformers', '-')}, {result['dtype']}; data: "
             f"{result['data']} (mean {result['doc_tokens_mean']:.0f} tokens, p10-p90 {result['doc_tokens_p10_p90']}); "
             f"model {result['model']}; {result['budget_tokens']} useful tokens per step; load average "
             f"{result['load_average']}", "",
             "| method | useful tokens/s | median step (s) | efficiency |", "|---|---|---|---|"]
    for name in ("fastmath_packed", "hf_sdpa_padded_random", "hf_sdpa_padded_grouped"):
        r = c[name]
        eff = r.get("packing_efficiency", r.get("padding_efficiency"))
        lines.append(f"| {name} | {r['useful_tokens_per_s']:,.0f} | {r['median_step_s']:.3f} | {eff:.1%} |")
    lines += ["", f"fastmath vs the better HF batching: **{c['speedup_vs_best_hf']:.2f}x**"]
    if result.get("mfu"):
        lines += ["", "| attention | kernels | tokens/s | MFU vs 989 TFLOP/s | MFU vs measured peak | max mem (GB) |",
                  "|---|---|---|---|---|---|"]
        for r in result["mfu"]:
            if "skipped" in r:
                lines.append(f"| {r['backend']} | {r['kernels']} | skipped ({r['skipped']}) | | | |")
            else:
                mem = "-" if r["max_memory_gb"] is None else f"{r['max_memory_gb']:.1f}"
                lines.append(f"| {r['backend']} | {r['kernels']} | {r['useful_tokens_per_s']:,.0f} | {r['mfu_vs_989']:.1%} "
                             f"| {r['mfu_vs_measured']:.1%} | {mem} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

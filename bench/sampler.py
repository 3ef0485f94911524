"""Sampling throughput: fastmath's sampler vs Hugging Face generate(num_return_sequences=N), in one run.

CPU (default): for the `tiny` preset and a ~50M-parameter model, each trained briefly on procedural
problems with the trainer's Python API (so that completions stop at different lengths; or pass --model DIR),
sample N=256 answers for each of a few held-out prompts with both engines (same weights, prompts,
temperature/top-p, max new tokens, stop on EOS), and report generated tokens/s (tokens up to and including
each sample's stop), samples/s, the speed-up, and the fraction of identical samples between two slot counts.

GPU (--gpu): a LLaMA-2-7B-shaped model with random weights in bf16: tokens/s with N=256, the fraction of
the memory-bandwidth roofline per decode step (weights + KV bytes read / step time, against a measured
device copy), and the largest number of concurrent sequences the card holds.

Results go to $FASTMATH_BENCH_OUT (default bench/results) as sampler_<cpu|gpu>.json, naming hardware,
versions, shapes and date.

--engine (CPU, issue 14): the request-stream engine against the sampler of an earlier commit (default: the
last one before the engine split), loaded from `git show COMMIT:fastmath/sampler.py` into a temporary module
and run in the same process on the same model and prompts (interleaved repetitions, median tokens/s, their
ratio, identical samples); and the compiled static decode step (torch.compile, inductor on the CPU) against
eager: compile time, tokens/s, identical samples. Written into sampler_cpu.json under "engine" (the rest of
the file is kept).

--gpu --smoke runs the same GPU code on the CPU with the `test` preset, a few samples and tokens, a small copy
buffer and a small KV budget (numbers meaningless), writing sampler_gpu_smoke.json: a broken GPU path is found
on the CPU, not on a scarce GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastmath.checkpoint import load_model, save_checkpoint
from fastmath.config import ModelArgs, get_preset
from fastmath.data import encode_prompt
from fastmath.model import Transformer, num_params
from fastmath.sampler import Sampler, SamplingParams
from fastmath.synth.procedural import SMALL_CONFIG, SMALL_SPEC, heldout_set
from fastmath.tokenizer import Tokenizer

M50 = dict(dim=640, n_layers=10, n_heads=10, multiple_of=64)  # ~50M parameters with a 512-token vocabulary


def env_info() -> dict:
    import transformers

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    return info


def train_models(work: Path, steps: int, steps_50m: int, which: list[str]) -> dict[str, Path]:
    """Brief trainer runs: `tiny` from scratch, then a ~50M model (random init with tiny's tokenizer)."""
    from fastmath.train import TrainConfig, train

    common = dict(procedural=SMALL_SPEC, procedural_examples=6000, val_examples=20, eval_problems=0, batch_tokens=8192,
                  micro_batch_tokens=4096, save_minutes=0, progress=False, device="cpu", lr=2e-3, warmup=0.05)
    t0 = time.time()
    s = train(TrainConfig(model="tiny", max_steps=steps, out=str(work / "runs_tiny"), **common), log=lambda *a: None)
    tiny = Path(s["run_dir"]) / "final"
    print(f"trained tiny for {steps} steps in {time.time() - t0:.0f}s (val loss {s.get('val_loss', float('nan')):.3f})")
    if "50m" not in which:
        return {"tiny": tiny}
    tok = Tokenizer(tiny)
    torch.manual_seed(0)
    big = Transformer(ModelArgs(vocab_size=tok.vocab_size, max_seq_len=1024, **M50))
    save_checkpoint(big, work / "init_50m", tokenizer_path=tok.path)
    t0 = time.time()
    # a small batch and a high rate: a few CPU minutes, enough to learn the format and to stop at varied lengths
    s = train(TrainConfig(model=str(work / "init_50m"), max_steps=steps_50m, out=str(work / "runs_50m"),
                          **{**common, "lr": 3e-3, "batch_tokens": 2048, "micro_batch_tokens": 2048}), log=lambda *a: None)
    print(f"trained 50M for {steps_50m} steps in {time.time() - t0:.0f}s (val loss {s.get('val_loss', float('nan')):.3f})")
    out = {"tiny": tiny, "50m": Path(s["run_dir"]) / "final"}
    return {k: v for k, v in out.items() if k in which}


def count_until_stop(tokens: list[int], eos: int) -> int:
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def bench_hf(ckpt: Path, prompts, params: SamplingParams, eos: int) -> dict:
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32).eval()
    tokens, samples, t0 = 0, 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            torch.manual_seed(params.seed)
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=True,
                              num_return_sequences=params.n, temperature=params.temperature, top_p=params.top_p,
                              top_k=0, max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=0)
            for row in out[:, len(p):].tolist():
                tokens += count_until_stop(row, eos)
                samples += 1
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "samples": samples, "seconds": dt, "tokens_per_s": tokens / dt, "samples_per_s": samples / dt}


def bench_fastmath(model, tok, prompts, params: SamplingParams, max_slots=None, kv_cache_gb=None, cls=None, **kw):
    sampler = (cls or Sampler)(model, tok, max_slots=max_slots, kv_cache_gb=kv_cache_gb, **kw)
    t0 = time.perf_counter()
    res = sorted(sampler.run(prompts, params), key=lambda r: r.index)
    dt = time.perf_counter() - t0
    toks = [[c.tokens for c in r.samples] for r in res]
    n_tok = sum(len(t) for r in toks for t in r)
    n_s = sum(len(r) for r in toks)
    st = sampler.stats
    return toks, {"tokens": n_tok, "samples": n_s, "seconds": dt, "tokens_per_s": n_tok / dt, "samples_per_s": n_s / dt,
                  "slots": sampler.plan.n_slots, "decode_steps": st["decode_steps"],
                  "mean_batch": st["slot_steps"] / max(st["decode_steps"], 1),
                  "mean_length": n_tok / n_s}


def run_cpu(a, save) -> dict:
    results = {"env": env_info(), "settings": {"n": a.n, "problems": a.problems, "max_new_tokens": a.max_new_tokens,
                                               "temperature": a.temperature, "top_p": a.top_p, "stop": "EOS or max"},
               "models": {}}
    work = Path(tempfile.mkdtemp(prefix="fm_bench_sampler_"))
    models = {"given": Path(a.model)} if a.model else train_models(work, a.train_steps, a.train_steps_50m,
                                                                            a.models.split(","))
    params = SamplingParams(n=a.n, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                            seed=0, stop_at_answer=False)  # EOS + max tokens: the same stop rule as HF
    for name, ckpt in models.items():
        model = load_model(ckpt, device="cpu", dtype=torch.float32)
        tok = Tokenizer(ckpt)
        cfg = json.loads((ckpt.parent / "config.json").read_text()).get("config", {}) if (ckpt.parent / "config.json").is_file() else {}
        template = cfg.get("template", "vicuna")
        prompts = [encode_prompt(tok, r["question"], template) for r in heldout_set(a.problems, SMALL_CONFIG)]
        toks_a, fm = bench_fastmath(model, tok, prompts, params, max_slots=a.slots[0])
        toks_b, fm_b = bench_fastmath(model, tok, prompts, params, max_slots=a.slots[1])
        same = sum(x == y for ra, rb in zip(toks_a, toks_b) for x, y in zip(ra, rb)) / fm["samples"]
        hf = bench_hf(ckpt, prompts, params, tok.eos_id)
        r = {"params": num_params(model), "prompt_tokens": [len(p) for p in prompts], "fastmath": fm,
             f"fastmath_{a.slots[1]}_slots": fm_b, "hf": hf, "speedup_tokens_per_s": fm["tokens_per_s"] / hf["tokens_per_s"],
             f"identical_samples_{a.slots[0]}_vs_{a.slots[1]}_slots": same}
        results["models"][name] = r
        print(f"{name:>5} ({r['params'] / 1e6:.1f}M params): fastmath {fm['tokens_per_s']:,.0f} tok/s "
              f"{fm['samples_per_s']:.1f} samples/s ({fm['slots']} slots, mean batch {fm['mean_batch']:.0f}, "
              f"mean length {fm['mean_length']:.0f}) | {a.slots[1]} slots {fm_b['tokens_per_s']:,.0f} tok/s | "
              f"HF {hf['tokens_per_s']:,.0f} tok/s {hf['samples_per_s']:.1f} samples/s | "
              f"speed-up {r['speedup_tokens_per_s']:.2f}x | identical samples {100 * same:.1f}%", flush=True)
        results["env"]["loadavg_end"] = os.getloadavg()
        save(results)  # after each model, so a long run keeps what it measured
    return results


BASE_COMMIT = "d0f460f"  # the last commit before the engine split (issue 14)


def load_base_sampler(commit: str):
    """fastmath/sampler.py as of `commit`, imported as a temporary module inside the fastmath package."""
    import importlib.util
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{commit}:fastmath/sampler.py"], cwd=repo, check=True, capture_output=True,
                         text=True).stdout
    name = "fastmath._sampler_at_" + commit
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    mod.__package__ = "fastmath"
    sys.modules[name] = mod
    exec(compile(src, f"{commit}:fastmath/sampler.py", "exec"), mod.__dict__)
    return mod


def _same(a, b) -> float:
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)


def run_engine(a) -> dict:
    import statistics

    base = load_base_sampler(a.base)
    work = Path(tempfile.mkdtemp(prefix="fm_bench_engine_"))
    models = {a.model_name: Path(a.model)} if a.model else train_models(work, a.train_steps, 0, ["tiny"])
    params = SamplingParams(n=a.n, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                            seed=0, stop_at_answer=False)
    out = {"env": env_info(), "base_commit": a.base, "settings": {"n": a.n, "problems": a.problems,
           "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "slots": a.slots[0], "reps": a.reps,
           "compile_buckets": a.compile_buckets}, "models": {}}
    for name, ckpt in models.items():
        model = load_model(ckpt, device="cpu", dtype=torch.float32)
        tok = Tokenizer(ckpt)
        cfg = json.loads((ckpt.parent / "config.json").read_text()).get("config", {}) if (ckpt.parent / "config.json").is_file() else {}
        prompts = [encode_prompt(tok, r["question"], cfg.get("template", "vicuna")) for r in heldout_set(a.problems, SMALL_CONFIG)]
        tps = {"base": [], "engine": []}
        toks = {}
        for _ in range(a.reps):  # interleaved, so that load changes hit both alike
            for which, cls in (("base", base.Sampler), ("engine", Sampler)):
                toks[which], r = bench_fastmath(model, tok, prompts, params, max_slots=a.slots[0], cls=cls)
                tps[which].append(r["tokens_per_s"])
        med = {k: statistics.median(v) for k, v in tps.items()}
        r = {"checkpoint": str(ckpt), "params": num_params(model), "tokens": sum(len(t) for x in toks["engine"] for t in x),
             "base_tokens_per_s": tps["base"], "engine_tokens_per_s": tps["engine"],
             "engine_vs_base_tokens_per_s": med["engine"] / med["base"],
             "identical_samples_engine_vs_base": _same(toks["base"], toks["engine"])}
        print(f"{name}: engine {med['engine']:,.0f} tok/s vs {a.base} {med['base']:,.0f} tok/s: "
              f"ratio {r['engine_vs_base_tokens_per_s']:.3f}; identical samples "
              f"{100 * r['identical_samples_engine_vs_base']:.1f}%", flush=True)
        if a.compile_buckets:
            buckets = [int(b) for b in a.compile_buckets.split(",")]
            t0 = time.perf_counter()
            ctoks, c = bench_fastmath(model, tok, prompts, params, max_slots=a.slots[0], compile=True, buckets=buckets)
            compile_s = time.perf_counter() - t0  # the first run compiles every bucket it meets
            runs = [bench_fastmath(model, tok, prompts, params, max_slots=a.slots[0], compile=True,
                                   buckets=buckets)[1]["tokens_per_s"] for _ in range(a.reps)]
            stoks, st = bench_fastmath(model, tok, prompts, params, max_slots=a.slots[0], static_step=True,
                                       buckets=buckets)
            r["compiled"] = {"first_run_seconds_with_compile": compile_s, "tokens_per_s": runs,
                             "vs_eager_tokens_per_s": statistics.median(runs) / med["engine"],
                             "static_step_uncompiled_tokens_per_s": st["tokens_per_s"],
                             "identical_samples_compiled_vs_eager": _same(toks["engine"], ctoks)}
            print(f"{name}: compiled step {statistics.median(runs):,.0f} tok/s ({r['compiled']['vs_eager_tokens_per_s']:.2f}x "
                  f"eager; static step uncompiled {st['tokens_per_s']:,.0f} tok/s; first run with compile "
                  f"{compile_s:.0f}s); identical samples {100 * r['compiled']['identical_samples_compiled_vs_eager']:.1f}%",
                  flush=True)
        out["models"][name] = r
    out["env"]["loadavg_end"] = os.getloadavg()
    return out


# --gpu --smoke: the GPU code on the CPU, tiny everything (a check of the script, not a measurement)
SMOKE = dict(preset="test", n=4, new_tokens=6, copy_bytes=2**20, kv_cache_gb=0.004)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_gpu(a) -> dict:
    smoke = a.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    preset = SMOKE["preset"] if smoke else "llama2-7b"
    kv_cache_gb = SMOKE["kv_cache_gb"] if smoke else None  # None: the budget comes from free CUDA memory
    results = {"env": env_info(), "models": {}}
    if smoke:
        results["smoke"] = True
        a.n, a.gpu_new_tokens = SMOKE["n"], SMOKE["new_tokens"]
    x = torch.empty(SMOKE["copy_bytes"] if smoke else 2**30, dtype=torch.uint8, device=dev)  # measured copy bandwidth: the practical roofline
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(dev)
    copy_bw = 2 * 10 * x.numel() / (time.perf_counter() - t0)
    del x, y
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the KV budget comes from free memory
    results["copy_bandwidth_GBps"] = copy_bw / 1e9
    args = get_preset(preset)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    model.eval()

    class RandomTok:  # random weights: no text, EOS never forced
        vocab_size, eos_id, bos_id = args.vocab_size, 2, 1

        def id_to_piece(self, i):
            return "x"

        def decode(self, ids):
            return ""

    tok = RandomTok()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (n,), generator=g).tolist() for n in (180, 120)]
    params = SamplingParams(n=a.n, temperature=0.7, max_new_tokens=a.gpu_new_tokens, stop_at_answer=False)
    sampler = Sampler(model, tok, kv_cache_gb=kv_cache_gb)
    plan512 = sampler.prepare(prompts, SamplingParams(n=4096, max_new_tokens=512))
    results["max_concurrent_sequences_512_new_tokens"] = plan512.n_slots
    sampler = Sampler(model, tok, max_slots=a.n, kv_cache_gb=kv_cache_gb)
    list(sampler.run([prompts[0][:20]], SamplingParams(n=8, max_new_tokens=8)))  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    res = list(sampler.run(prompts, params))
    _sync(dev)
    dt = time.perf_counter() - t0
    n_tok = sum(len(c.tokens) for r in res for c in r.samples)
    st = sampler.stats
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bpt = sampler.plan.bytes_per_token
    mean_batch = st["slot_steps"] / st["decode_steps"]
    # bytes a decode step must read: the weights once, each live prompt's KV once, each sequence's suffix KV
    mean_suffix = a.gpu_new_tokens / 2
    step_bytes = wbytes + bpt * (sum(len(p) for p in prompts) / len(prompts) + mean_batch * mean_suffix)
    step_time = dt / st["decode_steps"]
    results["models"][f"{preset}-random-bf16"] = {
        "params": num_params(model), "n": a.n, "max_new_tokens": a.gpu_new_tokens, "prompt_tokens": [len(p) for p in prompts],
        "tokens": n_tok, "seconds": dt, "tokens_per_s": n_tok / dt, "samples_per_s": len(res) * a.n / dt,
        "slots": sampler.plan.n_slots, "mean_batch": mean_batch, "decode_step_ms": 1e3 * step_time,
        "bytes_per_step_GB": step_bytes / 1e9, "roofline_fraction": step_bytes / step_time / copy_bw,
        "roofline_fraction_vs_3350GBps": step_bytes / step_time / 3.35e12}
    print(json.dumps(results["models"], indent=1))
    print(f"max concurrent sequences (512 new tokens): {plan512.n_slots}; copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU part (LLaMA-2-7B shape, random weights)")
    p.add_argument("--model", default=None, help="a trained checkpoint directory (default: train tiny and ~50M briefly)")
    p.add_argument("--n", type=int, default=256, help="samples per problem (default 256)")
    p.add_argument("--problems", type=int, default=2, help="held-out procedural problems (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation limit (default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0)")
    p.add_argument("--slots", type=int, nargs=2, default=[256, 64], help="two slot counts to compare (default 256 64)")
    p.add_argument("--models", default="tiny,50m", help="which CPU models to train and measure (default tiny,50m)")
    p.add_argument("--train-steps", type=int, default=150, help="trainer steps for tiny (default 150)")
    p.add_argument("--train-steps-50m", type=int, default=30, help="trainer steps for the 50M model (default 30)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for both engines (0 = torch's default; 1 is faster on a loaded machine)")
    p.add_argument("--engine", action="store_true",
                   help="CPU: the engine vs the sampler of --base (same process) and the compiled decode step; "
                        "written into sampler_cpu.json under 'engine'")
    p.add_argument("--base", default=BASE_COMMIT, help=f"with --engine: the commit to compare with (default {BASE_COMMIT})")
    p.add_argument("--model-name", default="given", help="with --engine --model: its name in the results")
    p.add_argument("--reps", type=int, default=3, help="with --engine: interleaved repetitions (default 3)")
    p.add_argument("--compile-buckets", default="64,256",
                   help="with --engine: slot buckets of the compiled step ('' = skip the compile part; default 64,256)")
    p.add_argument("--gpu-new-tokens", type=int, default=256, help="GPU: tokens per sample (default 256)")
    p.add_argument("--smoke", action="store_true",
                   help="with --gpu: run the GPU code on the CPU to check the script (the `test` preset, "
                        f"n={SMOKE['n']}, {SMOKE['new_tokens']} new tokens, a {SMOKE['copy_bytes'] >> 20} MiB copy "
                        f"buffer, a {SMOKE['kv_cache_gb'] * 1024:.0f} MiB KV budget; numbers meaningless); "
                        "writes sampler_gpu_smoke.json, never sampler_gpu.json")
    a = p.parse_args(argv)
    if a.smoke and not a.gpu:
        p.error("--smoke checks the GPU part on the CPU: use it with --gpu")
    out = Path(os.environ.get("FASTMATH_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = out / f"sampler_{'gpu' if a.gpu else 'cpu'}{'_smoke' if a.smoke else ''}.json"

    def save(res):
        path.write_text(json.dumps(res, indent=2))

    if a.engine:
        path = out / "sampler_cpu.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old["engine"] = run_engine(a)
        save(old)
    else:
        save(run_gpu(a) if a.gpu else run_cpu(a, save))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

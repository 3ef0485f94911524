"""`fastmath sample`'s application: problems -> engine -> grading -> samples.jsonl, summary.json, pass_at_k.png."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..engine.batch import Sampler
from ..engine.kv_cache import _size
from ..engine.sampling import SamplingParams
from .config import SampleConfig

def evaluate(config: SampleConfig | None = None, *, progress: bool = True, log=print, **options) -> dict:
    """Sample, grade and summarise: samples.jsonl (as problems finish), summary.json, pass_at_k.png.

    Args:
        config: every option of `fastmath sample` (see its --help); or give them as keyword `options`.
        progress: show a progress bar. log: where one-line messages go.
    Resumes an existing `out` folder made with the same arguments; under torchrun each rank samples every
    world-th remaining problem and rank 0 merges.
    Returns:
        the summary dict on rank 0, None on other ranks (which write only their samples shard).
    Raises:
        sample_io.SampleError / ValueError with a one-sentence message for bad inputs.
    """
    sc = config if config is not None else SampleConfig(**options)
    if config is not None and options:
        sc = dataclasses.replace(config, **options)
    (model, data, out, n, temperature, top_p, top_k, max_new_tokens, seed, greedy, problems, template, fewshot,
     stop_at_answer, kv_cache_gb, max_slots, device, dtype, compile_) = (
        sc.model, sc.data, sc.out, sc.n, sc.temperature, sc.top_p, sc.top_k, sc.max_new_tokens,
        sc.seed, sc.greedy, sc.problems, sc.template, sc.fewshot, sc.stop_at_answer, sc.kv_cache_gb,
        sc.max_slots, sc.device, sc.dtype, sc.compile)
    import time

    from tqdm import tqdm

    from .. import distributed as dist_mod
    from .. import fsio, metrics
    from .. import sample_io as io
    from ..train.lora import load_model_or_adapter
    from ..data import check_chat_template, check_template
    from ..tokenizer import Tokenizer

    ckpt, run_dir = io.resolve_model(model)
    cfg = io.run_config(run_dir)
    template = template or cfg.get("template") or "vicuna"
    check_template(template)  # a bad template is an error before anything runs
    probs, data_desc = io.load_problems(data, problems, cfg)
    out_dir = Path(out) if out else (run_dir or ckpt) / "eval"
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed, greedy=greedy, stop_at_answer=stop_at_answer)

    dist = dist_mod.init(device)
    torch_dtype = {"auto": torch.bfloat16 if dist.device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16, "fp32": torch.float32}[dtype]
    run_args = {"model": str(ckpt), "data": data_desc, "n": n, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "greedy": greedy,
                "template": template, "fewshot": fewshot, "stop_at_answer": stop_at_answer,
                "dtype": str(torch_dtype).replace("torch.", "")}
    if dist.is_main:
        io.check_run_args(out_dir, run_args)
    dist_mod.barrier(dist)
    if not dist.is_main:
        io.check_run_args(out_dir, run_args)  # same verdict on every rank (rank 0 wrote the file)
    done = io.all_records(out_dir)
    dist_mod.barrier(dist)  # everyone has read what is finished before anyone appends
    todo = [p for p in probs if p.index not in done]
    mine = [probs[i] for i in io.my_share([p.index for p in todo], dist.rank, dist.world_size)]
    if dist.is_main and done:
        log(f"resuming {out_dir}: {len(probs) - len(todo)} of {len(probs)} problems already sampled")

    seconds, tokens = 0.0, 0
    if mine:
        net, _ = load_model_or_adapter(ckpt, base=sc.base, device=dist.device, dtype=torch_dtype)
        tok = Tokenizer(ckpt)
        tok.check_model_vocab(net.args.vocab_size)
        check_chat_template(tok, template)
        prompts = io.encode_prompts(tok, mine, template, fewshot)
        by_index = {p.index: p for p in mine}
        sampler = Sampler(net, tok, kv_cache_gb=kv_cache_gb, max_slots=max_slots, compile=compile_)
        plan = sampler.prepare(prompts, params, [p.index for p in mine])  # fails now, not after the bar starts
        if dist.is_main:
            log(f"{plan.n_slots} slots, {plan.n_prefixes} prompt entries, KV cache {_size(plan.cache_bytes)} "
                f"on {dist.device}")
        shard = out_dir / io.shard_name(dist.rank, dist.world_size)
        io.repair_tail(shard)
        bar = tqdm(total=len(mine), unit="problem", desc="sampling", disable=not (progress and dist.is_main),
                   dynamic_ncols=True)
        t0, grading = time.perf_counter(), 0.0  # tokens/s counts sampling time only, not grading
        unchecked = False
        # whole lines only (a full disk: StorageError, after the bar is closed)
        with fsio.AppendFile(shard, hint=io.RESUME_HINT) as f, bar:
            for res in sampler.run(prompts, params, indices=[p.index for p in mine]):
                tg = time.perf_counter()
                p = by_index[res.index]
                g = res.greedy
                rec = metrics.problem_record(
                    p.id, p.question, p.answer, [c.text for c in res.samples], [len(c.tokens) for c in res.samples],
                    greedy_completion=g.text if g else None, greedy_token_count=len(g.tokens) if g else None,
                    type=p.type, level=p.level, index=p.index, prompt_tokens=res.prompt_tokens,
                    finish_reasons=[c.finish_reason for c in res.samples])
                if not metrics.validate(rec, "samples", optional=True) and not unchecked:
                    unchecked = True
                    log("jsonschema is not installed: samples.jsonl and summary.json are written without a schema check")
                f.append(json.dumps(rec) + "\n")
                grading += time.perf_counter() - tg
                elapsed = time.perf_counter() - t0 - grading
                bar.update(1)
                bar.set_postfix_str(f"{sampler.stats['generated_tokens'] / max(elapsed, 1e-9):,.0f} tok/s, "
                                    f"{sampler.plan.n_slots} slots")
        bar.close()
        seconds, tokens = time.perf_counter() - t0 - grading, sampler.stats["generated_tokens"]
    if dist.enabled:  # all ranks' tokens; the wall time is the slowest rank's
        t = torch.tensor([float(tokens), seconds], dtype=torch.float64)
        import torch.distributed as tdist

        tdist.all_reduce(t[:1])
        tdist.all_reduce(t[1:], op=tdist.ReduceOp.MAX)
        tokens, seconds = int(t[0]), float(t[1])
    dist_mod.barrier(dist)
    summary = None
    if dist.is_main:
        timing = io.add_timing(out_dir, seconds, tokens)
        recs = {int(r["index"]): r for r in io.merge_shards(out_dir)}
        chosen = [recs[p.index] for p in probs if p.index in recs]
        missing = len(probs) - len(chosen)
        if missing:
            raise io.SampleError(f"{out_dir}: {missing} problems have no samples after the run")
        summary = metrics.summarize(chosen, n=n, seconds=timing["seconds"] or None,
                                    generated_tokens=timing["generated_tokens"])
        summary.update({"model": str(ckpt), "data": data_desc, "temperature": temperature, "top_p": top_p,
                        "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed})
        metrics.validate(summary, "summary", optional=True)
        fsio.atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2), hint=io.RESUME_HINT)
        try:
            io.plot_pass_at_k(summary, out_dir / "pass_at_k.png", title=f"{ckpt.parent.name}/{ckpt.name}")
        except ImportError as e:  # matplotlib is a declared dependency, but a --no-deps install may lack it
            log(f"pass_at_k.png skipped: {e}")
    dist_mod.teardown(dist)
    return summary

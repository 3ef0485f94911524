"""The Xwin-Math paper's findings in miniature, on a CPU: data scaling, Pass@256 vs PassRatio@256, p^steps, errors.

    .venv/bin/python bench/repro_paper.py --threads 1            # the full run (~35 min on 2 idle CPU cores)
    .venv/bin/python bench/repro_paper.py --threads 1 --quick    # the same pipeline, smaller (~8 min)

What it does, with fastmath's own pipeline end to end:
1. Pre-trains ONE small base model (cached, keyed by its settings) on plain procedural solution text
   (`{"text": question + solution}`, no prompt template), from random weights, with `fastmath.train`.
2. Fine-tunes copies of it (SFT, the short `plain` prompt) on nested subsets of formatted procedural examples
   of several sizes (same epochs and learning rate for every size).
3. Samples `n` answers per held-out problem at temperature 0.7 plus one greedy answer, with
   `fastmath.sampler.evaluate` (graded by fastmath.grading, summarised by fastmath.metrics), on 200 held-out
   problems whose answers spread over hundreds of values: the guessing floor (Pass@n of n draws from the
   other problems' answers, fastmath.metrics.guessing_baseline) is reported beside every Pass@n.
4. Classifies every wrong answer exactly from the procedural steps (fastmath.synth.error_analysis:
   calculation error, reasoning error, no answer / format), the paper's Figure 5.
5. Runs the stages registered in STAGES (each writes its dict under its own key in the results).
6. Writes bench/results/repro_paper.json (+ .md tables), repro_paper_scaling.png (Pass@n, PassRatio@n,
   greedy and majority-vote accuracy against the SFT data size, with the floor), repro_paper_steps.png (greedy
   accuracy against the number of reasoning steps, with the fitted single-step accuracy p: accuracy ~ p^steps)
   and repro_paper_errors.png (error classes per SFT size). Every figure is recomputable from the samples
   files named in the JSON (kept under --work-dir; a rerun regenerates them identically).

The problem difficulty is fixed beforehand from the smallest run alone: `--calibrate SPEC` runs only the
pre-training, the smallest SFT and its sampling for a difficulty SPEC and records the trial; every trial
made with the current settings is copied into the results. Everything is cached under --work-dir and
resumable: a rerun skips finished stages and continues interrupted training or sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The difficulty used by the scaling runs, chosen with --calibrate from the smallest run alone (the trials
# are listed in bench/results/repro_paper.json under "difficulty_trials").
DIFFICULTY = ("min_steps=1 max_steps=3 max_operand=20 max_start=999 max_factor=3 max_value=999 ops=add,sub,mul "
              "test_fraction=0.1 style=terse carry=true")


@dataclass(frozen=True)
class Settings:
    """Every knob of the reproduction; the cache keys are derived from these values."""

    difficulty: str = DIFFICULTY  # procedural spec, as `fastmath train --procedural`
    # The base model (LLaMA architecture; vocabulary = the tokenizer's).
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    vocab: int = 512
    # Pre-training on plain text (no prompt format), from random weights.
    pretrain_examples: int = 20000
    pretrain_epochs: float = 1.0
    pretrain_lr: float = 1e-3
    # SFT: nested subsets (the first k examples of one stream), same epochs and lr for every size.
    sizes: tuple = (3000, 9000)  # 1,000 was tried first: Pass@256 55% missed the regime (difficulty_trials)
    sft_epochs: float = 3.0  # the paper's 3 epochs
    sft_lr: float = 3e-4
    template: str = "plain"  # "Question: ...\nAnswer:"; the paper's Vicuna prompt would double the tokens per example
    batch_tokens: int = 4096  # one packed micro-batch per optimizer step
    # Evaluation: n samples at temperature T plus greedy, on held-out (test-split) problems.
    problems: int = 200
    n: int = 256
    temperature: float = 0.7
    max_new_tokens: int = 96
    seed: int = 0

    def base_key(self) -> dict:
        return {k: getattr(self, k) for k in ("difficulty", "dim", "n_layers", "n_heads", "vocab", "pretrain_examples",
                                             "pretrain_epochs", "pretrain_lr", "template", "batch_tokens", "seed")}

    def sft_key(self, size: int) -> dict:
        return {**self.base_key(), "size": size, "sft_epochs": self.sft_epochs, "sft_lr": self.sft_lr}

    def eval_key(self) -> dict:
        return {k: getattr(self, k) for k in ("difficulty", "problems", "n", "temperature", "max_new_tokens", "seed",
                                             "template")}


# --quick: the same pipeline at about a fifth of the cost.
QUICK = dict(pretrain_examples=6000, sizes=(1000, 3000), problems=100, n=64)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def say(msg: str) -> None:
    print(f"[repro {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Data


def write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def heldout_file(s: Settings, work: Path) -> Path:
    """Held-out problems (test split: no arithmetic skeleton of them is in any training text), with steps."""
    from fastmath.synth import procedural as P
    from fastmath.train import parse_procedural

    path = work / "data" / f"heldout-v2-{digest(s.eval_key())}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        recs = P.heldout_set(s.problems, parse_procedural(s.difficulty), seed=s.seed)
        write_jsonl(path, [{"id": f"heldout-{i}", "question": r["question"], "solution": r["solution"],
                            "answer": r["answer"], "steps": r["steps"], "level": r["steps"], "start": r["start"],
                            "ops": r["ops"]} for i, r in enumerate(recs)])
    return path


def sft_file(s: Settings, size: int, work: Path) -> Path:
    """The first `size` formatted training problems of the SFT stream (seed+1; a stream apart from pre-training)."""
    from fastmath.synth import procedural as P
    from fastmath.train import parse_procedural

    path = work / "data" / f"sft-{digest([s.difficulty, s.seed])}-{size}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        recs = P.generate(size, parse_procedural(s.difficulty), split="train", seed=s.seed + 1)
        write_jsonl(path, [{k: r[k] for k in ("question", "solution", "answer", "steps")} for r in recs])
    return path


# ----------------------------------------------------------------------------------------------------------
# Training (fastmath.train does the work)


def _finished_run(parent: Path) -> Path | None:
    latest = parent / "latest"
    return latest.resolve() if (latest / "final" / "config.json").is_file() and (latest / "summary.json").is_file() \
        else None


def _train(cfg, parent: Path) -> tuple[Path, dict, bool]:
    """(run dir, trainer summary, cached?) of a run under `parent`: reused when finished, else resumed or started."""
    from fastmath.train import list_checkpoints, train

    done = _finished_run(parent)
    if done is not None:
        return done, json.loads((done / "summary.json").read_text()), True
    latest = parent / "latest"
    resume = str(latest.resolve()) if latest.exists() and list_checkpoints(latest.resolve()) else None
    summary = train(cfg, resume=resume, log=say)
    if summary.get("interrupted"):
        raise SystemExit(f"training stopped by a signal; rerun the same command to resume ({summary['run_dir']})")
    return Path(summary["run_dir"]), summary, False


def base_model(s: Settings, work: Path) -> tuple[Path, dict, bool]:
    """Tokenizer, random initial checkpoint and plain-text pre-training of the base model (cached)."""
    import torch

    from fastmath.checkpoint import save_checkpoint
    from fastmath.config import ModelArgs
    from fastmath.data import render_prompt
    from fastmath.model import Transformer
    from fastmath.synth import procedural as P
    from fastmath.tokenizer import Tokenizer, train_tokenizer
    from fastmath.train import TrainConfig, parse_procedural

    d = work / f"base-{digest(s.base_key())}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.json").write_text(json.dumps(s.base_key(), indent=2))
    pcfg = parse_procedural(s.difficulty)
    plain = d / "pretrain.jsonl"
    if not plain.is_file():
        write_jsonl(plain, ({"text": r["text"]} for r in
                            P.generate(s.pretrain_examples, pcfg, split="train", seed=s.seed, plain=True)))
    # The tokenizer plays LLaMA's: trained once on general text, which here includes the chat template.
    tok_path = d / "tokenizer.model"
    if not tok_path.is_file():
        texts = [json.loads(line)["text"] for line in plain.read_text().splitlines()[:5000]]
        texts += [render_prompt(r["question"], s.template) for r in P.generate(500, pcfg, "train", seed=s.seed + 99)]
        train_tokenizer(texts, tok_path, s.vocab)
    init = d / "init"
    if not (init / "config.json").is_file():
        tok = Tokenizer(tok_path)
        torch.manual_seed(s.seed)
        model = Transformer(ModelArgs(dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, vocab_size=tok.vocab_size,
                                      multiple_of=64, max_seq_len=1024))
        save_checkpoint(model, init, tokenizer_path=tok_path)
    cfg = TrainConfig(model=str(init), data=[str(plain)], epochs=s.pretrain_epochs, lr=s.pretrain_lr, beta2=0.98,
                      micro_batch_tokens=s.batch_tokens, batch_tokens=s.batch_tokens, val_examples=0, eval_problems=0,
                      max_len=512, seed=s.seed, out=str(d / "runs"), save_minutes=5.0, keep=1,
                      cache_dir=str(work / "tokens"), log_every=10)
    return _train(cfg, d / "runs")


def sft_model(s: Settings, size: int, base_final: Path, work: Path, progress: bool = True) -> tuple[Path, dict, bool]:
    from fastmath.train import TrainConfig

    d = work / f"sft-{digest(s.sft_key(size))}-{size}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.json").write_text(json.dumps(s.sft_key(size), indent=2))
    cfg = TrainConfig(model=str(base_final), data=[str(sft_file(s, size, work))], template=s.template,
                      epochs=s.sft_epochs, lr=s.sft_lr, micro_batch_tokens=s.batch_tokens, batch_tokens=s.batch_tokens,
                      val_examples=0, eval_problems=0, max_len=512, seed=s.seed, out=str(d / "runs"),
                      save_minutes=5.0, keep=1, cache_dir=str(work / "tokens"), log_every=10, progress=progress)
    return _train(cfg, d / "runs")


# ----------------------------------------------------------------------------------------------------------
# Sampling (fastmath.sampler.evaluate) and the per-step analysis


def sample(s: Settings, run_dir: Path, heldout: Path, progress: bool = True) -> tuple[Path, dict]:
    from fastmath.sampler import evaluate

    out = run_dir / f"eval-{digest(s.eval_key())}"
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return out, json.loads(summary_path.read_text())
    summary = evaluate(model=str(run_dir), data=str(heldout), out=str(out), n=s.n, temperature=s.temperature,
                       max_new_tokens=s.max_new_tokens, seed=s.seed, greedy=True, template=s.template, progress=progress, log=say)
    return out, summary


def greedy_by_steps(samples_path: Path, heldout: Path) -> dict:
    """{steps: {"problems", "correct", "accuracy"}} of the greedy answers (steps from the held-out file)."""
    steps = {r["id"]: r["steps"] for r in read_jsonl(heldout)}
    out: dict = {}
    for rec in read_jsonl(samples_path):
        g = out.setdefault(str(steps[rec["id"]]), {"problems": 0, "correct": 0})
        g["problems"] += 1
        g["correct"] += int(bool(rec["greedy_correct"]))
    for g in out.values():
        g["accuracy"] = g["correct"] / g["problems"]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def error_classes(samples_path: Path, heldout: Path) -> dict:
    """Exact error classes (fastmath.synth.error_analysis) of the wrong samples and wrong greedy answers."""
    from fastmath.synth.error_analysis import summarize

    problems = {r["id"]: r for r in read_jsonl(heldout)}
    return summarize(read_jsonl(samples_path), problems)


def guessing_floor(heldout: Path, n: int) -> dict:
    """Pass@1 and Pass@n of guessing: n draws from the other held-out problems' answers
    (fastmath.metrics.guessing_baseline, the floor every summary.json reports)."""
    from fastmath.metrics import guessing_baseline

    answers = [r["answer"] for r in read_jsonl(heldout)]
    g = guessing_baseline(answers, sorted({1, n}))
    return {"pass_at_1": g["pass_at_k"]["1"], f"pass_at_{n}": g["pass_at_k"][str(n)], "problems": g["problems"],
            "distinct_answers": len(set(answers)), "source": g["source"]}


def fit_single_step(by_steps: dict) -> float:
    """Maximum-likelihood p of the model accuracy(steps) = p ** steps from per-step greedy counts.

    The log-likelihood sum_s [c_s * s * log p + (n_s - c_s) * log(1 - p^s)] is concave in p, so a golden-section
    search on (0, 1) finds its maximum; all-correct gives 1, none-correct gives 0.
    """
    pts = [(int(k), v["correct"], v["problems"]) for k, v in by_steps.items()]
    if all(c == n for _, c, n in pts):
        return 1.0
    if all(c == 0 for _, c, _ in pts):
        return 0.0

    def ll(p):
        return sum(c * s * math.log(p) + (n - c) * math.log1p(-p ** s) for s, c, n in pts)

    lo, hi = 1e-9, 1 - 1e-12
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = ll(a), ll(b)
    for _ in range(200):
        if fa > fb:  # the maximum is in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = ll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = ll(b)
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------------------
# One model end to end, calibration, the scaling runs


def run_one(s: Settings, size: int, base_final: Path, heldout: Path, work: Path, progress: bool = True) -> dict:
    """SFT on `size` examples, sampling and the per-step analysis of one model (all cached)."""
    t0 = time.time()
    run_dir, tsum, cached = sft_model(s, size, base_final, work, progress)
    t1 = time.time()
    say(f"SFT on {size} examples: {tsum['steps']} steps, final loss {tsum['final_loss']:.4f}"
        f"{' (cached)' if cached else f', {t1 - t0:.0f} s'}; sampling {s.n}+greedy per problem on {s.problems} problems")
    eval_dir, summary = sample(s, run_dir, heldout, progress)
    by_steps = greedy_by_steps(eval_dir / "samples.jsonl", heldout)
    run = {"sft_examples": size, **summary,
           "greedy_by_steps": by_steps, "single_step_accuracy": fit_single_step(by_steps),
           "errors": error_classes(eval_dir / "samples.jsonl", heldout),
           "samples_file": _rel(eval_dir / "samples.jsonl"), "train_run": _rel(run_dir),
           "train": {k: tsum.get(k) for k in ("steps", "epochs", "tokens_seen", "train_seconds", "tokens_per_s",
                                              "final_loss", "lr")},
           "train_cached": cached, "stage_seconds": time.time() - t0}
    n = s.n
    say(f"  {size}: Pass@{n} {summary['pass_at_k'][str(n)]:.1%}, PassRatio@{n} {summary['pass_ratio']:.1%}, "
        f"majority {summary['majority_accuracy']:.1%}, greedy {summary['greedy_accuracy']:.1%}, "
        f"p={run['single_step_accuracy']:.3f}")
    return run


def _rel(p: Path) -> str:
    p = Path(p).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def meets_regime(run: dict, n: int) -> bool:
    """The paper's regime for the smallest run: often solved within n samples (Pass@n >= 60%), yet unstably
    (PassRatio@n at most a third of Pass@n)."""
    p = run["pass_at_k"][str(n)]
    return p >= 0.6 and run["pass_ratio"] <= p / 3


def trials_path(work: Path) -> Path:
    return work / "difficulty_trials.jsonl"


def calibrate(s: Settings, work: Path) -> dict:
    """Pre-train and run the smallest size for the difficulty in `s`; append the trial to the trials file."""
    t0 = time.time()
    base_run, bsum, _ = base_model(s, work)
    run = run_one(s, min(s.sizes), base_run / "final", heldout_file(s, work), work)
    trial = {"difficulty": s.difficulty, "settings": {k: v for k, v in dataclasses.asdict(s).items()
                                                      if k != "difficulty"},
             "size": run["sft_examples"], "greedy_accuracy": run["greedy_accuracy"],
             "majority_accuracy": run["majority_accuracy"], "pass_ratio": run["pass_ratio"],
             f"pass_at_{s.n}": run["pass_at_k"][str(s.n)], "single_step_accuracy": run["single_step_accuracy"],
             "greedy_by_steps": run["greedy_by_steps"], "meets_regime": meets_regime(run, s.n),
             "guessing_floor": guessing_floor(heldout_file(s, work), s.n),
             "seconds": time.time() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(trials_path(work), "a") as f:
        f.write(json.dumps(trial) + "\n")
    say(f"trial {s.difficulty!r}: greedy {trial['greedy_accuracy']:.1%}, Pass@{s.n} {trial[f'pass_at_{s.n}']:.1%} "
        f"PassRatio {trial['pass_ratio']:.1%}, floor {trial['guessing_floor'][f'pass_at_{s.n}']:.1%} "
        f"-> {'meets' if trial['meets_regime'] else 'misses'} the regime (Pass@{s.n} >= 60%, PassRatio <= Pass/3)")
    return trial


def hardware() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_sizes(s: Settings, base_final: Path, heldout: Path, work: Path, workers: int) -> list[dict]:
    """run_one for every size; with workers > 1, in that many processes (largest size first), no progress bars."""
    sizes = sorted(s.sizes)
    if workers <= 1 or len(sizes) == 1:
        return [run_one(s, size, base_final, heldout, work) for size in sizes]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    say(f"{len(sizes)} SFT runs in {workers} processes of {torch.get_num_threads()} thread(s) each")
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(torch.get_num_threads(),)) as ex:
        futures = {size: ex.submit(run_one, s, size, base_final, heldout, work, False) for size in sizes[::-1]}
        return [futures[size].result() for size in sizes]


@dataclass
class Context:
    """What the scaling stage leaves for the stages after it (each a function of this, see STAGES)."""

    settings: Settings
    work: Path
    results: Path
    quick: bool
    workers: int
    heldout: Path  # the held-out problems every model is evaluated on (with start/ops/steps)
    base_final: Path  # the pre-trained base checkpoint every SFT starts from
    runs: list  # run_one() dicts of the scaling runs, smallest size first


# Stages after the scaling runs: (key, function(Context) -> dict). Each result is written into the results JSON
# under its key (e.g. a Table-1 stage comparing real and synthetic SFT data can reuse `run_one`, `sft_model`
# and `sample` and the scaling run of the same size as its "real" arm).
STAGES: list = []


def register_table1(table1_settings=None, teacher_url: str | None = None) -> None:
    """Add the Table-1 stage (bench/repro_table1.py) to STAGES under "table1": a teacher trained on the synthesis
    calls and served by `fastmath serve`, the unchanged `fastmath synth` against it, skeleton decontamination, and
    students fine-tuned from this run's base on real vs synthetic data. It writes repro_table1.json/.md/.png
    beside this run's results.

    table1_settings: a repro_table1.Table1Settings (default: its full or --quick settings); teacher_url: an
    OpenAI-compatible endpoint to synthesize from instead of the trained teacher.
    """
    sys.path.append(str(Path(__file__).resolve().parent))
    import repro_table1 as T1

    def stage(ctx: Context) -> dict:
        s = T1.R.Settings(**dataclasses.asdict(ctx.settings))  # repro_table1's copy of this module's class
        t = table1_settings or T1.table1_settings(ctx.quick)
        out = T1.table1(s, t, ctx.work, ctx.quick, ctx.workers, teacher_url=teacher_url)
        T1.write_results(out, ctx.results)
        return out

    STAGES[:] = [(k, f) for k, f in STAGES if k != "table1"] + [("table1", stage)]


def targets(out: dict) -> dict:
    """The issue's absolute targets, checked on the results (True/False each)."""
    n = out["settings"]["n"]
    runs = out["runs"]
    first = runs[0]
    rising = {key: all(b >= a for a, b in zip(vals, vals[1:])) and vals[-1] > vals[0]
              for key, vals in (("pass_ratio", [r["pass_ratio"] for r in runs]),
                                ("majority_accuracy", [r["majority_accuracy"] for r in runs]),
                                ("greedy_accuracy", [r["greedy_accuracy"] for r in runs]))}
    return {"guessing_floor_at_most_25pct": out["guessing_floor"][f"pass_at_{n}"] <= 0.25,
            f"smallest_pass_at_{n}_at_least_60pct": first["pass_at_k"][str(n)] >= 0.6,
            "smallest_pass_ratio_at_most_a_third_of_pass": first["pass_ratio"] <= first["pass_at_k"][str(n)] / 3,
            **{f"{k}_rises_with_data": v for k, v in rising.items()}}


def scaling(s: Settings, work: Path, results: Path, quick: bool, workers: int = 2) -> dict:
    from fastmath.train import versions

    t_start = time.time()
    hw = hardware()
    heldout = heldout_file(s, work)
    floor = guessing_floor(heldout, s.n)
    say(f"{s.problems} held-out problems, {floor['distinct_answers']} distinct answers: guessing floor "
        f"Pass@{s.n} {floor[f'pass_at_{s.n}']:.1%}")
    say(f"base model: pre-training on {s.pretrain_examples} plain procedural texts ({s.pretrain_epochs:g} epoch), "
        f"difficulty {s.difficulty!r}")
    t0 = time.time()
    base_run, bsum, base_cached = base_model(s, work)
    base_seconds = time.time() - t0
    say(f"base model ready: {base_run}{' (cached)' if base_cached else f' in {base_seconds:.0f} s'}, "
        f"final loss {bsum['final_loss']:.4f}")
    runs = run_sizes(s, base_run / "final", heldout, work, workers)
    trials = read_jsonl(trials_path(work)) if trials_path(work).is_file() else []
    def others(d):  # the settings a trial shares with the runs (the list of sizes aside)
        return json.loads(json.dumps({k: v for k, v in d.items() if k not in ("difficulty", "sizes")}))

    for t in trials:  # every trial is kept; the ones made with this run's other settings are marked
        t["same_settings_as_runs"] = others(t["settings"]) == others(dataclasses.asdict(s))
    out = {
        "benchmark": "repro_paper", "mode": "quick" if quick else "full", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hw, "versions": versions(),
        "settings": dataclasses.asdict(s), "heldout_file": _rel(heldout),
        "base_model": {"run": _rel(base_run), "cached": base_cached, "train": bsum,
                       "params": json.loads((base_run / "final" / "config.json").read_text())},
        "difficulty_trials": trials,
        "guessing_floor": floor,
        "runs": runs,
    }
    out["targets"] = targets(out)
    ctx = Context(settings=s, work=work, results=results, quick=quick, workers=workers, heldout=heldout,
                  base_final=base_run / "final", runs=runs)
    stage_wall = {}
    for key, fn in STAGES:
        t0 = time.time()
        out[key] = fn(ctx)
        stage_wall[key] = time.time() - t0
    out["hardware"]["load_average_at_end"] = list(os.getloadavg())
    out["total_seconds"] = time.time() - t_start
    out["stage_seconds"] = {  # as measured when each stage ran (cached stages keep their original times)
        "base_pretrain": bsum["train_seconds"],
        "sft": {r["sft_examples"]: r["train"]["train_seconds"] for r in runs},
        "sampling": {r["sft_examples"]: r["seconds"] for r in runs},
        "serial_sum": bsum["train_seconds"] + sum(r["train"]["train_seconds"] + (r["seconds"] or 0) for r in runs),
        **{f"stage_{k}_wall": v for k, v in stage_wall.items()},
    }
    out["note"] = ("total_seconds is the wall time of this invocation only (cached stages cost nothing here); "
                   "stage_seconds has each stage's time from when it ran")
    results.mkdir(parents=True, exist_ok=True)
    (results / "repro_paper.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / "repro_paper.md").write_text(markdown_table(out))
    plot_scaling(out, results / "repro_paper_scaling.png")
    plot_steps(out, results / "repro_paper_steps.png")
    plot_errors(out, results / "repro_paper_errors.png")
    say(f"wrote {results / 'repro_paper.json'}, .md and three figures in {time.time() - t_start:.0f} s")
    print(markdown_table(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# Report


def markdown_table(out: dict) -> str:
    s = out["settings"]
    n = s["n"]
    fl = out["guessing_floor"]
    lines = [f"SFT examples | train steps | train s | Pass@1 | Pass@{n} | PassRatio@{n} | majority | greedy | "
             f"p (single step) | sampling tok/s",
             "---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:"]
    for r in out["runs"]:
        lines.append(f"{r['sft_examples']:,} | {r['train']['steps']} | {r['train']['train_seconds']:.0f} | "
                     f"{r['pass_at_k']['1']:.1%} | {r['pass_at_k'][str(n)]:.1%} | {r['pass_ratio']:.1%} | "
                     f"{r['majority_accuracy']:.1%} | {r['greedy_accuracy']:.1%} | {r['single_step_accuracy']:.3f} | "
                     f"{(r.get('tokens_per_second') or 0):,.0f}")
    lines.append(f"guessing (floor) | | | {fl['pass_at_1']:.1%} | {fl[f'pass_at_{n}']:.1%} | | | | |")
    err = ["", f"Wrong answers by class (Figure 5 in miniature), share of all {n} samples per problem "
               "(greedy answers in brackets):", "",
           "SFT examples | wrong | calculation | reasoning (steps / operation / operand) | no answer / format",
           "---: | ---: | ---: | ---: | ---:"]
    for r in out["runs"]:
        e, g = r["errors"]["samples"], r["errors"]["greedy"]
        t, gt = e["total"], max(1, g["total"])
        k = e["reasoning_kinds"]
        err.append(f"{r['sft_examples']:,} | {e['wrong'] / t:.1%} [{g['wrong'] / gt:.0%}] | "
                   f"{e['calculation'] / t:.1%} [{g['calculation'] / gt:.0%}] | "
                   f"{e['reasoning'] / t:.1%} [{g['reasoning'] / gt:.0%}] ({k['steps'] / t:.1%} / "
                   f"{k['operation'] / t:.1%} / {k['operand'] / t:.1%}) | {e['no_answer'] / t:.1%} [{g['no_answer'] / gt:.0%}]")
    b, st = out["base_model"], out["stage_seconds"]
    hw = out["hardware"]
    load = ", ".join(f"{x:.1f}" for x in hw["load_average_at_start"]) if hw.get("load_average_at_start") else "?"
    head = (f"# The paper in miniature ({out['mode']} run, {out['date']})\n\n"
            f"{hw['cpu']}, {hw['cores']} cores (load average {load} at the start), torch {out['versions'].get('torch')}. "
            f"Difficulty `{s['difficulty']}`; base model {b['params'].get('hidden_size')}-dim, "
            f"{b['params'].get('num_hidden_layers')} layers, pre-trained on {s['pretrain_examples']:,} plain texts "
            f"({b['train']['train_seconds']:.0f} s); SFT {s['sft_epochs']:g} epochs at lr {s['sft_lr']:g}; "
            f"{s['problems']} held-out problems ({fl['distinct_answers']} distinct answers), {n} samples at "
            f"T={s['temperature']} + greedy. Stage times as each ran: pre-training {st['base_pretrain']:.0f} s, "
            f"SFT {sum(st['sft'].values()):.0f} s, sampling {sum(v or 0 for v in st['sampling'].values()):.0f} s "
            f"(serial sum {st['serial_sum'] / 60:.1f} min; this invocation {out['total_seconds'] / 60:.1f} min). "
            f"Guessing (n draws from the other held-out answers) gives Pass@{n} {fl[f'pass_at_{n}']:.1%}.\n\n")
    tg = "\n\nTargets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out.get("targets", {}).items())
    t1 = ""
    if out.get("table1"):
        sys.path.append(str(Path(__file__).resolve().parent))
        import repro_table1 as T1

        t1 = "\n\n" + T1.markdown_table(out["table1"]).replace("# Table 1", "## Table 1", 1)
    return head + "\n".join(lines) + "\n" + "\n".join(err) + tg + t1 + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(out: dict, path: Path) -> None:
    """Pass@n, PassRatio@n, majority-vote and greedy accuracy against the SFT data size (the paper's Figure 3)."""
    plt = _plt()
    n = out["settings"]["n"]
    runs = out["runs"]
    x = [r["sft_examples"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label, style in [(lambda r: r["pass_at_k"][str(n)], f"Pass@{n}", "o-"),
                              (lambda r: r["majority_accuracy"], "majority vote", "^-"),
                              (lambda r: r["greedy_accuracy"], "greedy (first answer)", "s-"),
                              (lambda r: r["pass_ratio"], f"PassRatio@{n}", "D-")]:
        ax.plot(x, [100 * key(r) for r in runs], style, label=label)
    # calibration trials with these settings at sizes outside the runs: hollow markers, same colours
    sizes = {r["sft_examples"] for r in runs}
    trials = [t for t in out.get("difficulty_trials", []) if t.get("same_settings_as_runs")
              and t["difficulty"] == out["settings"]["difficulty"] and t["size"] not in sizes]
    for t in trials:
        for i, (key, style) in enumerate([(f"pass_at_{n}", "o"), ("majority_accuracy", "^"), ("greedy_accuracy", "s"),
                                          ("pass_ratio", "D")]):
            ax.plot([t["size"]], [100 * t[key]], style, mfc="none", color=f"C{i}")
    if trials:
        ax.plot([], [], "o", mfc="none", color="grey", label="calibration trial (not a run)")
        x = sorted(x + [t["size"] for t in trials])
    chance = out["guessing_floor"][f"pass_at_{n}"]
    ax.axhline(100 * chance, color="grey", ls=":", label=f"Pass@{n} by guessing (floor)")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:,}" for v in x])
    ax.minorticks_off()
    ax.set_xlabel("SFT examples")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(f"fastmath, paper in miniature: {runs[0]['problems']} problems, n={n}, T={out['settings']['temperature']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_steps(out: dict, path: Path) -> None:
    """Greedy accuracy against reasoning steps per model, with the fitted p^steps curve (the paper's Table 4)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, r in enumerate(out["runs"]):
        steps = [int(k) for k in r["greedy_by_steps"]]
        acc = [100 * v["accuracy"] for v in r["greedy_by_steps"].values()]
        p = r["single_step_accuracy"]
        ax.plot(steps, acc, "o", color=f"C{i}")
        grid = [1 + j * (max(steps) - 1) / 50 for j in range(51)] if max(steps) > 1 else [1]
        ax.plot(grid, [100 * p ** t for t in grid], "-", color=f"C{i}",
                label=f"{r['sft_examples']:,} SFT examples: p = {p:.3f}")
    all_steps = sorted({int(k) for r in out["runs"] for k in r["greedy_by_steps"]})
    ax.set_xticks(range(all_steps[0], all_steps[-1] + 1))
    ax.set_xlabel("reasoning steps")
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("first-answer accuracy ~ p^steps (dots: measured, lines: fit)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_errors(out: dict, path: Path) -> None:
    """Wrong samples per SFT size by exact error class, as a share of all samples (the paper's Figure 5)."""
    plt = _plt()
    runs = out["runs"]
    labels = [f"{r['sft_examples']:,}" for r in runs]
    classes = [("calculation", "calculation error"), ("reasoning", "reasoning error"),
               ("no_answer", "no answer / format")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    width = 0.8 / len(classes)
    for i, (key, label) in enumerate(classes):
        vals = [100 * r["errors"]["samples"][key] / r["errors"]["samples"]["total"] for r in runs]
        xs = [j + (i - (len(classes) - 1) / 2) * width for j in range(len(runs))]
        bars = ax.bar(xs, vals, width, label=label, color=f"C{i + 3}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(runs)), labels)
    ax.set_xlabel("SFT examples")
    ax.set_ylabel(f"share of all {out['settings']['n']} samples per problem (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("wrong answers by error class (exact, from the procedural steps)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Stage timings and all settings are written into the results JSON.")
    p.add_argument("--quick", action="store_true", help=f"smaller run (~8 min on 2 idle cores): {QUICK}")
    p.add_argument("--calibrate", action="append", metavar="SPEC", default=[],
                   help="run only pre-training + the smallest SFT + sampling for this difficulty spec and record "
                        "the trial (repeatable); the scaling runs are not started")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "repro_paper"),
                   help="cache of data, models and samples (default runs/repro_paper)")
    p.add_argument("--results", default=None,
                   help="folder for repro_paper.json/.md and the three PNGs (default bench/results; with --quick, "
                        "quick-results/ in the work dir, so a quick run never overwrites the committed results)")
    p.add_argument("--difficulty", default=None, help=f"procedural spec (default {d.difficulty!r})")
    p.add_argument("--sizes", default=None, help=f"comma-separated SFT data sizes (default {','.join(map(str, d.sizes))})")
    p.add_argument("--pretrain-examples", type=int, default=None, help=f"plain pre-training texts (default {d.pretrain_examples})")
    p.add_argument("--problems", type=int, default=None, help=f"held-out problems, 2..1000 (default {d.problems})")
    p.add_argument("-n", "--n", type=int, default=None, help=f"samples per problem (default {d.n})")
    p.add_argument("--dim", type=int, default=None, help=f"model width (default {d.dim})")
    p.add_argument("--n-layers", type=int, default=None, help=f"model depth (default {d.n_layers})")
    p.add_argument("--n-heads", type=int, default=None, help=f"attention heads (default {d.n_heads})")
    p.add_argument("--pretrain-epochs", type=float, default=None, help=f"pre-training epochs (default {d.pretrain_epochs})")
    p.add_argument("--batch-tokens", type=int, default=None, help=f"tokens per optimizer step (default {d.batch_tokens})")
    p.add_argument("--sft-epochs", type=float, default=None, help=f"SFT epochs for every size (default {d.sft_epochs})")
    p.add_argument("--sft-lr", type=float, default=None, help=f"SFT peak learning rate (default {d.sft_lr})")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"sample length limit (default {d.max_new_tokens})")
    p.add_argument("--template", default=None, help=f"SFT/sampling prompt template (default {d.template!r})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: on a busy 2-core machine, 2 threads per process ran "
                        "up to 8x slower than 1)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes for the SFT+sampling runs after pre-training (default 2, one per core)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of data, initialisation and sampling (default {d.seed})")
    p.add_argument("--no-table1", action="store_true",
                   help="skip the Table-1 stage (teacher + fastmath synth + real vs synthetic students; "
                        "bench/repro_table1.py runs it alone)")
    return p.parse_args(argv)


def settings_from_args(a) -> Settings:
    kw = dict(QUICK) if a.quick else {}
    for name in ("difficulty", "pretrain_examples", "pretrain_epochs", "batch_tokens", "problems", "n", "dim", "n_layers", "n_heads", "sft_epochs",
                 "sft_lr", "max_new_tokens", "seed", "template"):
        v = getattr(a, name)
        if v is not None:
            kw[name] = v
    if a.sizes:
        try:
            kw["sizes"] = tuple(sorted(int(x) for x in a.sizes.split(",") if x.strip()))
        except ValueError:
            raise SystemExit(f"error: --sizes must be comma-separated integers, got {a.sizes!r}") from None
    s = Settings(**kw)
    from fastmath.train import parse_procedural

    try:
        parse_procedural(s.difficulty)
    except ValueError as e:
        raise SystemExit(f"error: --difficulty {s.difficulty!r}: {e}") from None
    if not 2 <= s.problems <= 1000:
        raise SystemExit(f"error: --problems must be in 2..1000 (the guessing floor needs two), got {s.problems}")
    if s.n < 1 or not s.sizes or min(s.sizes) < 1:
        raise SystemExit("error: --n and every --sizes value must be >= 1")
    return s


def main(argv=None) -> int:
    a = parse_args(argv)
    s = settings_from_args(a)
    import torch

    torch.set_num_threads(max(1, a.threads))
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.calibrate:
        for spec in a.calibrate:
            calibrate(settings_from_args(argparse.Namespace(**{**vars(a), "difficulty": spec})), work)
        return 0
    results = Path(a.results) if a.results else (work / "quick-results" if a.quick else REPO / "bench" / "results")
    if not a.no_table1:
        register_table1()
    scaling(s, work, results, a.quick, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Xwin-Math paper's Table 1 in miniature: students fine-tuned on synthetic vs real data at equal sizes.

    .venv/bin/python bench/repro_table1.py --threads 1            # the full stage (~20 min on 2 CPU cores)
    .venv/bin/python bench/repro_table1.py --threads 1 --quick    # the same pipeline, smaller (~5 min)

Everything goes through fastmath's own tools:
1. A teacher (a small fastmath model from random weights with its own tokenizer) is trained with
   `fastmath.train` on the synthesis pipeline's two calls answered from the procedural generator
   (`fastmath.synth.teacher_tasks`): rewriting a seed question into a new procedural question with its
   verification, and solving a question step by step, in the reply formats `fastmath synth` parses.
2. `fastmath serve` serves it on 127.0.0.1; the unchanged `fastmath synth` CLI (create + verify, solve, dedup,
   consistency) writes synthetic records from seed questions (the real training questions) against it.
3. Decontamination by arithmetic skeleton (`fastmath.synth.skeleton`): synthetic and real items whose
   skeleton equals a held-out problem's are removed, the same way for both arms (templated text defeats
   word n-gram decontamination).
4. Students are fine-tuned from the same base model as bench/repro_paper.py at equal sizes on real vs
   synthetic data and evaluated on the same held-out set (greedy, PassRatio@n, Pass@n, majority), with
   repro_paper's functions (the real arm at a size IS repro_paper's scaling model at that size, cached).
5. The teacher's error rate over every kept synthetic item (each synthetic question solved exactly from its
   skeleton) and the fraction of synthetic skeletons absent from the real training set are reported.

Importable: `table1(s, t, work, quick, workers) -> dict` (the results' "table1" key), `markdown_table(out)` and
`plot_table1(out, path)`. Everything is cached under --work-dir and resumable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # repro_paper, when imported from elsewhere
import repro_paper as R  # noqa: E402

from fastmath.serve.process import ServeProcess  # noqa: E402

REPO = R.REPO


@dataclass(frozen=True)
class Table1Settings:
    """Teacher, synthesis and Table 1 knobs (the students' settings are repro_paper's Settings)."""

    sizes: tuple = (1000, 2000)
    # Teacher: LLaMA architecture, random init, its own tokenizer (the prompts are long English text).
    teacher_dim: int = 128
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_vocab: int = 2048  # an upper bound: word-bounded pieces stop at ~1,500 on this text
    # "words": pieces never span a space, so a question's person and item are the same token wherever they
    # occur; "spans" (pieces across words, prompts ~2.5x shorter) fused them into phrase pieces such as
    # "▁How▁many▁apples▁does▁Ines▁have▁now" and the teacher mixed people and items up (0 of 1,055 kept
    # questions well formed in the full run of 2026-12-03)
    teacher_tokenizer: str = "words"
    # Each call's fixed instructions (~200 and ~80 words) are one piece of the teacher's tokenizer
    # (teacher_tasks.prompt_heads): question-call examples 431 -> 176 tokens, answer-call 202 -> 123, and the
    # server prefills only the questions
    teacher_prompt_pieces: bool = True
    teacher_question_tasks: int = 2500  # question-call examples (seed question -> new question + verification)
    teacher_answer_tasks: int = 3000  # answer-call examples
    teacher_plain: int = 8000  # plain question + solution texts (arithmetic practice)
    teacher_epochs: float = 2.0
    teacher_lr: float = 1e-3
    # Synthesis (fastmath synth options)
    synth_temperature: float = 0.5  # the paper's 1.0 is for GPT-4; a 1M-parameter teacher at 1.0 writes noise
    synth_consistency: int = 1
    synth_concurrency: int = 64
    synth_max_tokens: int = 320
    synth_margin: float = 0.05  # extra synthetic records requested, to cover decontamination removals

    def teacher_key(self, s: R.Settings) -> dict:
        return {"difficulty": s.difficulty, "seed": s.seed, **{k: v for k, v in dataclasses.asdict(self).items()
                                                               if k.startswith("teacher_")}}

    def synth_key(self, s: R.Settings) -> dict:
        return {**self.teacher_key(s), "target": self.synth_target(), "sft_seeds": [s.difficulty, s.seed],
                **{k: v for k, v in dataclasses.asdict(self).items() if k.startswith("synth_")}}

    def synth_target(self) -> int:
        return int(max(self.sizes) * (1 + self.synth_margin)) + 5


QUICK = dict(sizes=(250,), teacher_question_tasks=600, teacher_answer_tasks=1200, teacher_plain=5000)


def table1_settings(quick: bool = False, **overrides) -> Table1Settings:
    """The stage's settings for repro_paper.py's full or --quick run (overrides: any Table1Settings field)."""
    return Table1Settings(**{**(QUICK if quick else {}), **overrides})


def say(msg: str) -> None:
    print(f"[table1 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Teacher


def teacher_model(s: R.Settings, t: Table1Settings, work: Path, progress: bool = True) -> tuple[Path, dict, bool]:
    """Tokenizer, random initial checkpoint and training of the teacher on the pipeline's two calls (cached)."""
    import torch

    from fastmath.checkpoint import save_checkpoint
    from fastmath.config import ModelArgs
    from fastmath.model import Transformer
    from fastmath.synth.teacher_tasks import teacher_records, train_teacher_tokenizer
    from fastmath.tokenizer import Tokenizer
    from fastmath.train import TrainConfig, parse_procedural

    d = work / f"teacher-{R.digest(t.teacher_key(s))}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.json").write_text(json.dumps(t.teacher_key(s), indent=2))
    data = d / "teacher.jsonl"
    if not data.is_file():
        R.write_jsonl(data, teacher_records(parse_procedural(s.difficulty), t.teacher_question_tasks,
                                            t.teacher_answer_tasks, t.teacher_plain, seed=s.seed, template="plain"))
    tok_path = d / "tokenizer.model"
    if not tok_path.is_file():
        recs = R.read_jsonl(data)
        tok = train_teacher_tokenizer(recs[:3000], tok_path, t.teacher_vocab, words=t.teacher_tokenizer == "words",
                                      heads=t.teacher_prompt_pieces)
        # every question record must tokenize exactly as the server will see it: the prompt, then the reply
        for r in recs:
            if "text" in r and "FINAL CREATED QUESTION" in r["text"]:
                prompt, _, reply = r["text"].partition("\nAnswer: ")
                if tok.encode(r["text"], bos=True, eos=True) != (tok.encode(prompt + "\nAnswer:", bos=True)
                                                                 + tok.encode(reply, bos=False, eos=True)):
                    tok_path.unlink()
                    raise RuntimeError("the teacher tokenizer merges across the prompt/reply boundary")
    init = d / "init"
    if not (init / "config.json").is_file():
        tok = Tokenizer(tok_path)
        torch.manual_seed(s.seed)
        model = Transformer(ModelArgs(dim=t.teacher_dim, n_layers=t.teacher_layers, n_heads=t.teacher_heads,
                                      vocab_size=tok.vocab_size, multiple_of=64, max_seq_len=1024))
        save_checkpoint(model, init, tokenizer_path=tok_path)
    cfg = TrainConfig(model=str(init), data=[str(data)], template="plain", epochs=t.teacher_epochs, lr=t.teacher_lr,
                      beta2=0.98, micro_batch_tokens=s.batch_tokens, batch_tokens=s.batch_tokens, val_examples=0,
                      eval_problems=0, max_len=1024, seed=s.seed, out=str(d / "runs"), save_minutes=5.0, keep=1,
                      cache_dir=str(work / "tokens"), log_every=10, progress=progress)
    return R._train(cfg, d / "runs")


# ----------------------------------------------------------------------------------------------------------
# Serving and synthesis (the fastmath CLI, unchanged)


def synth_command(t: Table1Settings, seeds: Path, out: Path, base_url: str, model: str = "teacher") -> list[str]:
    """The `fastmath synth` command line of the stage (headroom: up to 3x the target in items)."""
    target = t.synth_target()
    return [sys.executable, "-m", "fastmath.cli", "synth", "--seeds", str(seeds), "--out", str(out),
            "--num-questions", str(target), "--max-items", str(3 * target + 10), "--model", model,
            "--base-url", base_url, "--concurrency", str(t.synth_concurrency),
            "--consistency", str(t.synth_consistency), "--temperature", str(t.synth_temperature),
            "--max-tokens", str(t.synth_max_tokens), "--no-progress"]


def synthesize(s: R.Settings, t: Table1Settings, teacher_run: Path | None, work: Path, threads: int = 1,
               teacher_url: str | None = None) -> tuple[Path, dict, float]:
    """(records file, synth report, seconds) of `fastmath synth` against the served teacher, or against the
    endpoint `teacher_url` (cached/resumed)."""
    d = work / f"synth-{R.digest({**t.synth_key(s), 'url': teacher_url})}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.json").write_text(json.dumps(t.synth_key(s), indent=2))
    out, report_path = d / "synth.jsonl", d / "synth.report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("complete") or report.get("stopped") == "max_items":
            return out, report, 0.0
    seeds = d / "seeds.jsonl"  # the real training questions seed the synthesis, as GSM8K's train set did
    if not seeds.is_file():
        R.write_jsonl(seeds, ({"id": f"seed-{i}", **r} for i, r in
                              enumerate(R.read_jsonl(R.sft_file(s, max(t.sizes), work)))))
    t0 = time.time()
    def run_synth(base_url):
        say(f"fastmath synth: {t.synth_target()} records from {seeds.name} against the teacher at {base_url}")
        env = {**os.environ, "OPENAI_API_KEY": "local", "OMP_NUM_THREADS": "1"}
        with open(d / "synth.log", "ab") as log:
            return subprocess.run(synth_command(t, seeds, out, base_url), stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=REPO).returncode

    if teacher_url is not None:
        rc = run_synth(teacher_url)
    else:
        with ServeProcess(teacher_run, "--served-model-name", "teacher", log_path=d / "serve.log", threads=threads,
                          cwd=REPO) as srv:
            rc = run_synth(srv.base_url)
    seconds = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"fastmath synth failed ({rc}); see {d / 'synth.log'}")
    report = json.loads(report_path.read_text())
    (d / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    return out, report, seconds


# ----------------------------------------------------------------------------------------------------------
# Decontamination, teacher errors, novelty


def decontaminate(records: list[dict], heldout_keys: set) -> tuple[list[dict], int]:
    """(records whose question's skeleton is not a held-out skeleton, number removed). The skeleton is read
    leniently (a model's question with mixed-up items still has its arithmetic); questions that do not parse
    as procedural questions have no skeleton and are kept."""
    from fastmath.synth.skeleton import question_key

    kept = [r for r in records if question_key(r["question"], strict=False) not in heldout_keys]
    return kept, len(records) - len(kept)


def teacher_errors(records: list[dict]) -> dict:
    """The kept answers checked against each question's exact answer (from its parsed skeleton).

    well_formed: questions in the generator's exact form (same person and item throughout); mixed_up: the
    sentence forms right but items or people mixed (solved from their arithmetic); unparseable: not a
    procedural question (counted as errors: no exact answer exists).
    """
    from fastmath.synth.parse import normalise_answer
    from fastmath.synth.skeleton import exact_answer, parse_question

    wrong = unparsed = well_formed = 0
    for r in records:
        exact = exact_answer(r["question"], strict=False)
        if exact is None:
            unparsed += 1
            continue
        well_formed += parse_question(r["question"]) is not None
        if normalise_answer(r["answer"]) != normalise_answer(exact):
            wrong += 1
    n = len(records)
    parsed = n - unparsed
    return {"items": n, "well_formed": well_formed, "mixed_up": parsed - well_formed, "unparseable_questions": unparsed,
            "wrong_answers": wrong, "error_rate": (wrong + unparsed) / n if n else None,
            "error_rate_parsed": wrong / parsed if parsed else None}


def novelty(synthetic: list[dict], real: list[dict]) -> dict:
    """How many synthetic skeletons (and question texts) do not occur in the real training set."""
    from fastmath.synth.skeleton import question_key

    real_keys = {question_key(r["question"], strict=False) for r in real}
    real_q = {r["question"].strip() for r in real}
    keys = [question_key(r["question"], strict=False) for r in synthetic]
    parsed = [k for k in keys if k is not None]
    return {"synthetic_items": len(synthetic), "parsed": len(parsed),
            "novel_skeletons": sum(k not in real_keys for k in parsed),
            "novel_skeleton_fraction": sum(k not in real_keys for k in parsed) / len(parsed) if parsed else None,
            "distinct_skeletons": len(set(parsed)),
            "question_copies_of_real": sum(r["question"].strip() in real_q for r in synthetic)}


# ----------------------------------------------------------------------------------------------------------
# Students


def sft_on(s: R.Settings, data: Path, tag: str, base_final: Path, work: Path, progress: bool = True):
    """repro_paper.sft_model's recipe on an explicit data file (cached by the file's digest)."""
    from fastmath.data import file_digest
    from fastmath.train import TrainConfig

    key = {**s.sft_key(0), "data": file_digest(data)}
    d = work / f"t1-sft-{R.digest(key)}-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "settings.json").write_text(json.dumps(key, indent=2))
    cfg = TrainConfig(model=str(base_final), data=[str(data)], template=s.template, epochs=s.sft_epochs, lr=s.sft_lr,
                      micro_batch_tokens=s.batch_tokens, batch_tokens=s.batch_tokens, val_examples=0, eval_problems=0,
                      max_len=512, seed=s.seed, out=str(d / "runs"), save_minutes=5.0, keep=1,
                      cache_dir=str(work / "tokens"), log_every=10, progress=progress)
    return R._train(cfg, d / "runs")


def run_arm(s: R.Settings, arm: str, size: int, data: Path | None, base_final: Path, heldout: Path, work: Path,
            progress: bool = True) -> dict:
    """Train (or reuse) and evaluate one student; data None = repro_paper's scaling model at this size."""
    t0 = time.time()
    if data is None:
        run = R.run_one(s, size, base_final, heldout, work, progress)
        return {"arm": arm, "size": size, "reused_scaling_model": True, **_metrics(run, s)}
    run_dir, tsum, cached = sft_on(s, data, f"{arm}-{size}", base_final, work, progress)
    eval_dir, summary = R.sample(s, run_dir, heldout, progress)
    say(f"{arm} {size}: SFT {tsum['steps']} steps{' (cached)' if cached else ''}; Pass@{s.n} "
        f"{summary['pass_at_k'][str(s.n)]:.1%}, PassRatio {summary['pass_ratio']:.1%}, majority "
        f"{summary['majority_accuracy']:.1%}, greedy {summary['greedy_accuracy']:.1%}")
    run = {**summary, "samples_file": R._rel(eval_dir / "samples.jsonl"), "train_run": R._rel(run_dir),
           "train": {k: tsum.get(k) for k in ("steps", "epochs", "tokens_seen", "train_seconds", "final_loss")},
           "train_cached": cached, "stage_seconds": time.time() - t0}
    return {"arm": arm, "size": size, "reused_scaling_model": False, "data_file": R._rel(data), **_metrics(run, s)}


def _metrics(run: dict, s: R.Settings) -> dict:
    keep = ("problems", "n", "pass_at_k", "pass_ratio", "majority_accuracy", "greedy_accuracy", "samples_file",
            "train_run", "train", "train_cached", "stage_seconds", "seconds")
    return {k: run.get(k) for k in keep}


def _base_and_real(s: R.Settings, sizes, heldout: Path, work: Path, reuse: bool, real_files: dict) -> tuple[str, list]:
    """Worker job: the base model, then every real-arm student (largest first)."""
    base_run, _, _ = R.base_model(s, work)
    runs = [run_arm(s, "real", size, None if reuse else real_files[size], base_run / "final", heldout, work, False)
            for size in sorted(sizes, reverse=True)]
    return str(base_run), runs


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# The stage


def _teacher_and_synth(s: R.Settings, t: Table1Settings, work: Path, threads: int, teacher_url: str | None,
                       progress: bool) -> dict:
    """Train and serve the teacher, run fastmath synth against it (or against `teacher_url`, a running endpoint)."""
    info = {"run": None, "summary": {}, "cached": None, "seconds": 0.0}
    if teacher_url is None:
        t0 = time.time()
        say(f"teacher: {t.teacher_question_tasks} question + {t.teacher_answer_tasks} answer tasks + "
            f"{t.teacher_plain} plain texts, {t.teacher_dim}-dim x {t.teacher_layers} layers")
        run, summary, cached = teacher_model(s, t, work, progress=progress)
        info.update(run=run, summary=summary, cached=cached, seconds=time.time() - t0)
        took = " (cached)" if cached else f", {info['seconds']:.0f} s"
        say(f"teacher ready: final loss {summary['final_loss']:.4f}{took}")
    synth_path, report, seconds = synthesize(s, t, info["run"], work, threads, teacher_url)
    say(f"synthesis: {report['kept']} records kept of {report['items_started']} items "
        f"({seconds:.0f} s this invocation), dropped {report['dropped']}")
    return {**info, "synth_path": synth_path, "report": report}


def table1(s: R.Settings, t: Table1Settings, work: Path, quick: bool = False, workers: int = 2,
           teacher_url: str | None = None) -> dict:
    """Teacher, synthesis, decontamination, both arms at every size; returns the results' "table1" dict.

    teacher_url: an OpenAI-compatible endpoint to synthesize from instead of training and serving a teacher
    (the tests give a scripted one); its synthesis is cached apart from the served teacher's.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from fastmath.synth.skeleton import question_key

    t_start = time.time()
    load_start = list(os.getloadavg())
    work.mkdir(parents=True, exist_ok=True)
    heldout = R.heldout_file(s, work)
    heldout_keys = {question_key(r["question"]) for r in R.read_jsonl(heldout)}
    if None in heldout_keys:
        raise RuntimeError(f"{heldout}: a held-out question does not parse as a procedural question")
    sizes = sorted(t.sizes)
    # Real arm: repro_paper's SFT stream, decontaminated the same way (its train split shares no skeleton with
    # the test split by construction, so nothing should go; when nothing does, the scaling models are reused).
    real_all = R.read_jsonl(R.sft_file(s, max(sizes), work))
    real_clean, real_removed = decontaminate(real_all, heldout_keys)
    reuse = real_removed == 0
    real_files = {}
    if not reuse:
        extra = R.read_jsonl(R.sft_file(s, 2 * max(sizes), work))[max(sizes):]
        real_clean += decontaminate(extra, heldout_keys)[0]
        for size in sizes:
            real_files[size] = work / "data" / f"t1-real-{R.digest([s.difficulty, s.seed])}-{size}.jsonl"
            R.write_jsonl(real_files[size], real_clean[:size])
    ctx = mp.get_context("spawn")
    threads = torch.get_num_threads()
    if workers <= 1:  # everything in this process, one stage after another
        base_run, real_runs = _base_and_real(s, sizes, heldout, work, reuse, real_files)
        teacher = _teacher_and_synth(s, t, work, threads, teacher_url, progress=True)
    else:  # the base model and the real arm in a worker while this process trains the teacher and synthesizes
        with ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
            real_job = ex.submit(_base_and_real, s, sizes, heldout, work, reuse, real_files)
            teacher = _teacher_and_synth(s, t, work, threads, teacher_url, progress=False)
            base_run, real_runs = real_job.result()
    synth_path, report = teacher["synth_path"], teacher["report"]
    synth_all = sorted(R.read_jsonl(synth_path), key=lambda r: r["item"])
    synth_clean, synth_removed = decontaminate(synth_all, heldout_keys)
    short = len(synth_clean) < max(sizes)
    if short:  # the pipeline stopped at its item cap (a weak teacher): train on what there is, and say so
        say(f"WARNING: only {len(synth_clean)} synthetic records after decontamination, {max(sizes)} wanted; the "
            "synthetic arm uses them all at the larger sizes (see 'examples' in each run)")
    synth_files = {}
    for size in sizes:
        synth_files[size] = synth_path.with_name(f"student-{size}.jsonl")
        R.write_jsonl(synth_files[size], [{k: r[k] for k in ("question", "solution", "answer")}
                                          for r in synth_clean[:size]])
    base_final = Path(base_run) / "final"
    if workers <= 1 or len(sizes) == 1:
        synth_runs = [run_arm(s, "synthetic", size, synth_files[size], base_final, heldout, work, workers <= 1)
                      for size in sizes]
    else:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
            futs = {size: ex.submit(run_arm, s, "synthetic", size, synth_files[size], base_final, heldout, work, False)
                    for size in sizes[::-1]}
            synth_runs = [futs[size].result() for size in sizes]
    for r in synth_runs:
        r["examples"] = min(r["size"], len(synth_clean))
    real_used = real_clean[:max(sizes)]
    synth_used = synth_clean[:max(sizes)]
    seconds_file = synth_path.parent / "seconds.json"  # as measured when the synthesis ran
    synth_seconds_all = json.loads(seconds_file.read_text())["seconds"] if seconds_file.is_file() else synth_seconds
    out = {
        "mode": "quick" if quick else "full", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": dataclasses.asdict(t), "student_settings": dataclasses.asdict(s),
        "heldout_file": R._rel(heldout), "heldout_problems": len(heldout_keys),
        "teacher": {"run": R._rel(teacher["run"]) if teacher["run"] else None, "url": teacher_url,
                    "cached": teacher["cached"],
                    "train": {k: teacher["summary"].get(k) for k in ("steps", "epochs", "tokens_seen", "train_seconds",
                                                                     "tokens_per_s", "final_loss")},
                    "params": json.loads((teacher["run"] / "final" / "config.json").read_text())
                    if teacher["run"] else {}},
        "synth": {"records_file": R._rel(synth_path), "command": synth_command(t, Path("SEEDS"), Path("OUT"), "URL")[3:],
                  "seconds": synth_seconds_all, "report": {k: report.get(k) for k in (
                      "requested", "kept", "items_started", "dropped", "rejected_replies", "consistency", "usage",
                      "stopped", "complete", "seconds_this_session")}},
        "decontamination": {"method": "arithmetic skeleton equal to a held-out problem's",
                            "synthetic": {"checked": len(synth_all), "removed": synth_removed},
                            "real": {"checked": len(real_all), "removed": real_removed}},
        "teacher_errors": {"all_kept": teacher_errors(synth_all), "used": teacher_errors(synth_used)},
        "novelty": novelty(synth_used, real_used),
        "runs": sorted([{**r, "examples": r["size"]} for r in real_runs] + synth_runs, key=lambda r: (r["size"], r["arm"])),
        "synthetic_short": short,
        "total_seconds": time.time() - t_start,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
    }
    runs = out["runs"]
    out["stage_seconds"] = {  # as measured when each stage ran (a cached stage costs nothing in total_seconds)
        "teacher_train": out["teacher"]["train"].get("train_seconds"), "synth": synth_seconds_all,
        "student_train": {f"{r['arm']}-{r['size']}": (r["train"] or {}).get("train_seconds") for r in runs},
        "student_sampling": {f"{r['arm']}-{r['size']}": r.get("seconds") for r in runs},
    }
    out["stage_seconds"]["serial_sum"] = sum(v or 0 for v in (
        out["stage_seconds"]["teacher_train"], synth_seconds_all, *out["stage_seconds"]["student_train"].values(),
        *out["stage_seconds"]["student_sampling"].values()))
    return out


# ----------------------------------------------------------------------------------------------------------
# Report


def markdown_table(out: dict) -> str:
    n = out["student_settings"]["n"]
    lines = [f"data | size | greedy | PassRatio@{n} | Pass@{n} | majority | samples",
             "--- | ---: | ---: | ---: | ---: | ---: | ---"]
    for r in out["runs"]:
        size = f"{r['size']:,}" if r.get("examples", r["size"]) == r["size"] else f"{r['examples']:,} (of {r['size']:,})"
        lines.append(f"{r['arm']} | {size} | {r['greedy_accuracy']:.1%} | {r['pass_ratio']:.1%} | "
                     f"{r['pass_at_k'][str(n)]:.1%} | {r['majority_accuracy']:.1%} | `{r['samples_file']}`")
    te, nv, dc, sy = out["teacher_errors"], out["novelty"], out["decontamination"], out["synth"]
    st = out["stage_seconds"]
    rep = sy["report"]
    tt = out["teacher"]
    teacher = (f"Teacher: {tt['params'].get('hidden_size')}-dim, {tt['params'].get('num_hidden_layers')} layers, "
               f"trained {tt['train']['train_seconds'] or 0:.0f} s on {tt['train']['tokens_seen'] or 0:,} tokens "
               f"(final loss {tt['train']['final_loss']:.3f}), served by `fastmath serve`. " if tt["run"]
               else f"Teacher: the endpoint {tt['url']}. ")
    head = (f"# Table 1 in miniature ({out['mode']} run, {out['date']})\n\n" + teacher +
            f"`fastmath synth` kept {rep['kept']:,} of {rep['items_started']:,} items "
            f"(dropped: {', '.join(f'{k} {v}' for k, v in (rep['dropped'] or {}).items() if v) or 'none'}) in "
            f"{(sy['seconds'] or 0):.0f} s. Teacher error rate over all {te['all_kept']['items']:,} kept items: "
            f"{te['all_kept']['error_rate']:.1%} ({te['all_kept']['wrong_answers']} wrong answers, "
            f"{te['all_kept']['unparseable_questions']} questions that are not procedural; "
            f"{te['all_kept']['well_formed']} questions well formed, {te['all_kept']['mixed_up']} with items or people "
            f"mixed up, solved from their arithmetic); over the "
            f"{te['used']['items']:,} used: {te['used']['error_rate']:.1%}. Synthetic skeletons absent from the real "
            f"training set: {nv['novel_skeletons']:,} of {nv['parsed']:,} ({(nv['novel_skeleton_fraction'] or 0):.1%}); "
            f"synthetic questions identical to a real one: {nv['question_copies_of_real']}. Decontamination by "
            f"skeleton removed {dc['synthetic']['removed']} of {dc['synthetic']['checked']:,} synthetic and "
            f"{dc['real']['removed']} of {dc['real']['checked']:,} real items. Stage times as each ran: teacher "
            f"{(st['teacher_train'] or 0):.0f} s, synthesis {(st['synth'] or 0):.0f} s, students "
            f"{sum(v or 0 for v in st['student_train'].values()):.0f} s training + "
            f"{sum(v or 0 for v in st['student_sampling'].values()):.0f} s sampling (serial sum "
            f"{st['serial_sum'] / 60:.1f} min; this invocation {out['total_seconds'] / 60:.1f} min, load "
            f"{out['load_average']['start'][0]:.1f} at start, {out['load_average']['end'][0]:.1f} at end).\n\n")
    return head + "\n".join(lines) + "\n"


def plot_table1(out: dict, path: Path) -> None:
    """Grouped bars: the four metrics for real and synthetic students at each size."""
    plt = R._plt()
    n = out["student_settings"]["n"]
    metrics = [("greedy_accuracy", "greedy"), ("pass_ratio", f"PassRatio@{n}"), ("majority_accuracy", "majority"),
               ("pass_at_k", f"Pass@{n}")]
    sizes = sorted({r["size"] for r in out["runs"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.6 * len(sizes), 4.0), dpi=120, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for j, arm in enumerate(("real", "synthetic")):
            r = next(x for x in out["runs"] if x["size"] == size and x["arm"] == arm)
            vals = [100 * (r[k][str(n)] if k == "pass_at_k" else r[k]) for k, _ in metrics]
            ax.bar([i + (j - 0.5) * 0.38 for i in range(len(metrics))], vals, 0.38, label=arm, color=f"C{j}")
        ax.set_xticks(range(len(metrics)), [m for _, m in metrics], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"{size:,} SFT examples")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    te = out["teacher_errors"]["all_kept"]["error_rate"]
    fig.suptitle(f"Table 1 in miniature: real vs synthetic (teacher error rate {te:.1%})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smaller run (~5 min on 2 cores): repro_paper's quick students and {QUICK}")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "repro_paper"),
                   help="cache of data, models and samples, shared with repro_paper.py (default runs/repro_paper)")
    p.add_argument("--results", default=None,
                   help="folder for repro_table1.json/.md/.png (default bench/results; with --quick, quick-results/ "
                        "in the work dir)")
    p.add_argument("--difficulty", default=None, help="procedural spec of every problem (default repro_paper's)")
    p.add_argument("--sizes", default=None, help="comma-separated SFT sizes of both arms (default 1000,2000)")
    p.add_argument("--problems", type=int, default=None, help="held-out problems (default repro_paper's)")
    p.add_argument("-n", "--n", type=int, default=None, help="samples per held-out problem (default repro_paper's)")
    p.add_argument("--pretrain-examples", type=int, default=None, help="base model pre-training texts (default repro_paper's)")
    p.add_argument("--teacher-question-tasks", type=int, default=None, help="teacher question-call examples")
    p.add_argument("--teacher-answer-tasks", type=int, default=None, help="teacher answer-call examples")
    p.add_argument("--teacher-plain", type=int, default=None, help="teacher plain question+solution texts")
    p.add_argument("--teacher-dim", type=int, default=None, help="teacher width")
    p.add_argument("--teacher-layers", type=int, default=None, help="teacher depth")
    p.add_argument("--teacher-tokenizer", choices=("words", "spans"), default=None,
                   help="teacher tokenizer pieces: words (never across a space; default) or spans (across words: "
                        "shorter prompts, but people and items fused into phrase pieces)")
    p.add_argument("--synth-consistency", type=int, default=None, help="fastmath synth --consistency (default 1)")
    p.add_argument("--synth-temperature", type=float, default=None, help="fastmath synth --temperature (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2, one per core)")
    return p.parse_args(argv)


def settings_from_args(a) -> tuple[R.Settings, Table1Settings]:
    s = R.settings_from_args(argparse.Namespace(**{**{k: None for k in (
        "difficulty", "pretrain_examples", "pretrain_epochs", "batch_tokens", "problems", "n", "dim", "n_layers",
        "n_heads", "sft_epochs", "sft_lr", "max_new_tokens", "seed", "template", "sizes")},
        "quick": a.quick, "difficulty": a.difficulty, "problems": a.problems, "n": a.n,
        "pretrain_examples": a.pretrain_examples}))
    kw = dict(QUICK) if a.quick else {}
    for name in ("teacher_question_tasks", "teacher_answer_tasks", "teacher_plain", "teacher_dim", "teacher_layers",
                 "teacher_tokenizer", "synth_consistency", "synth_temperature"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.sizes:
        try:
            kw["sizes"] = tuple(sorted(int(x) for x in a.sizes.split(",") if x.strip()))
        except ValueError:
            raise SystemExit(f"error: --sizes must be comma-separated integers, got {a.sizes!r}") from None
        if not kw["sizes"] or min(kw["sizes"]) < 1:
            raise SystemExit("error: every --sizes value must be >= 1")
    return s, Table1Settings(**kw)


def write_results(out: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "repro_table1.json").write_text(json.dumps({"benchmark": "repro_table1", "table1": out}, indent=2) + "\n")
    (results / "repro_table1.md").write_text(markdown_table(out))
    plot_table1(out, results / "repro_table1.png")


def main(argv=None) -> int:
    a = parse_args(argv)
    s, t = settings_from_args(a)
    import torch

    torch.set_num_threads(max(1, a.threads))
    work = Path(a.work_dir)
    results = Path(a.results) if a.results else (work / "quick-results" if a.quick else REPO / "bench" / "results")
    out = table1(s, t, work, a.quick, a.workers)
    write_results(out, results)
    say(f"wrote {results / 'repro_table1.json'}, .md and .png in {out['total_seconds']:.0f} s")
    print(markdown_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

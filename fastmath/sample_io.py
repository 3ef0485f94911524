"""Files around `fastmath sample`: which checkpoint, which problems, prompts, the output folder (resume,
argument checks, per-rank shards and their merge), summary, plot and table. No torch here.

Output folder (default `<run>/eval/`):
    run_args.json   the arguments that determine the samples; a rerun with other values is refused
    samples.jsonl   one graded problem per line (schema "samples" of fastmath.metrics), appended as
                    problems finish; under torchrun each rank appends to samples.rank<R>-of-<W>.jsonl
                    and rank 0 merges them into samples.jsonl at the end
    timing.json     sampling seconds and generated tokens accumulated over resumed sessions
    summary.json    fastmath.metrics.summarize of all problems, validated against schema "summary"
    pass_at_k.png   Pass@k curve
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import data as D
from . import fsio
from . import runs
from .synth import procedural as P

# Said after a failed write (fsio.StorageError): finished problems are in samples.jsonl, whole lines only.
RESUME_HINT = "the problems finished so far are kept; free some space and rerun the same command to resume"
DEFAULT_HELDOUT = 100  # problems of the built-in procedural held-out set when --problems is not given


class SampleError(ValueError):
    """A user-facing problem with the inputs or the output folder; the message says what and where."""


# ----------------------------------------------------------------------------------------------------------
# model and run directory


def _is_checkpoint(p: Path) -> bool:
    return runs.is_checkpoint(p)


def resolve_model(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint directory, run directory or None) for --model: fastmath.runs.resolve_model, whose errors
    become SampleError."""
    try:
        return runs.resolve_model(path)
    except runs.RunError as e:
        raise SampleError(str(e)) from None


def run_config(run_dir: Path | None) -> dict:
    """The training config of a run (empty when unknown)."""
    if run_dir is None or not (run_dir / "config.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "config.json").read_text()).get("config", {}) or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


# ----------------------------------------------------------------------------------------------------------
# problems and prompts


@dataclass
class Problem:
    index: int  # position in the data (seeds the sampling noise; the resume key)
    id: object  # the record's id when it has one, else the index
    question: str
    answer: str | None  # reference final answer
    type: str | None = None
    level: object = None


def load_problems(data: str | None, limit: int | None, cfg: dict) -> tuple[list[Problem], str]:
    """Problems from a JSONL file (GSM8K, MATH or fastmath records), or the built-in held-out procedural set.

    The built-in set uses the run's procedural difficulty and seed when known. Returns (problems, a
    description for run_args.json).
    """
    if data is None:
        spec = cfg.get("procedural", "") or ""
        from .train import parse_procedural

        pcfg = parse_procedural(spec) if spec else P.DEFAULT_CONFIG
        seed = int(cfg.get("seed", 0) or 0)
        recs = P.heldout_set(limit or DEFAULT_HELDOUT, pcfg, seed=seed)
        out = [Problem(i, i, r["question"], str(r["answer"])) for i, r in enumerate(recs)]
        return out, f"procedural-heldout:{spec or 'default'}:seed={seed}"
    path = Path(data)
    if not path.is_file():
        raise SampleError(f"{data}: data file not found")
    out = []
    try:
        for lineno, rec, ex in D.iter_examples(path):
            if limit and len(out) >= limit:
                break
            if ex.prompt is None:
                raise SampleError(f"{path}:{lineno}: a plain 'text' record has no question to answer")
            i = len(out)
            out.append(Problem(i, rec.get("id", rec.get("unique_id", i)), ex.prompt, ex.answer,
                               rec.get("type"), rec.get("level")))
    except SampleError:
        raise
    except ValueError as e:  # malformed JSON or an unknown record, already naming file and line
        raise SampleError(str(e)) from None
    if not out:
        raise SampleError(f"{path}: empty file (no problems)")
    return out, str(path.resolve())


def _shots(k: int, exclude: set[str]) -> list[tuple[str, str]]:
    """K solved procedural training problems (question, solution ending "The answer is: X")."""
    shots = [r for r in P.generate(k + len(exclude) + 8, split="train", seed=1234) if r["question"] not in exclude][:k]
    return [(r["question"], D.fastmath_response(r["solution"], r["answer"])[0]) for r in shots]


def fewshot_turns(k: int, exclude: set[str]) -> list[dict]:
    """The few-shot examples of `fewshot_prefix` as chat turns (user question, assistant solution)."""
    return [m for q, a in _shots(k, exclude) for m in (*D.chat_messages(q), {"role": "assistant", "content": a})]


def fewshot_prefix(k: int, template: str, exclude: set[str]) -> str:
    """K solved procedural training problems rendered with the template, for base models.

    Each shot is `render_prompt(question) + " " + solution ending "The answer is: X"`, shots separated by
    blank lines; the prompt of the real question follows.
    """
    if k <= 0:
        return ""
    parts = [D.render_prompt(q, template) + " " + response for q, response in _shots(k, exclude)]
    return "\n\n".join(parts) + "\n\n"


def encode_prompts(tokenizer, problems: list[Problem], template: str, fewshot: int) -> list[list[int]]:
    """BOS + [few-shot examples] + render_prompt(question): exactly what training saw without few-shot. Under the
    `chat` template, the checkpoint's template of [shots as user/assistant turns..., user question]."""
    if fewshot <= 0:
        return [D.encode_prompt(tokenizer, p.question, template) for p in problems]
    if template == D.CHAT:  # the shots as earlier turns of the conversation, under the checkpoint's template
        from .chat_template import encode_chat

        D.check_chat_template(tokenizer, template)
        turns = fewshot_turns(fewshot, {p.question for p in problems})
        return [encode_chat(tokenizer, turns + D.chat_messages(p.question)) for p in problems]
    prefix = fewshot_prefix(fewshot, template, {p.question for p in problems})
    return tokenizer.encode_batch([prefix + D.render_prompt(p.question, template) for p in problems], bos=True)


# ----------------------------------------------------------------------------------------------------------
# output folder: arguments, resume, shards


def check_run_args(out: Path, args: dict) -> None:
    """Write run_args.json, or check that an existing one holds the same arguments."""
    path = out / "run_args.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise SampleError(f"{path}: unreadable; remove the folder or choose another --out") from None
        diff = [k for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)]
        if diff:
            what = "; ".join(f"{k}: {old.get(k)!r} there, {args.get(k)!r} now" for k in diff)
            raise SampleError(f"{out} holds samples made with other arguments ({what}); use the same "
                              "arguments to resume, or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write(path, json.dumps(args, indent=2, sort_keys=True), hint=RESUME_HINT)


def shard_name(rank: int, world: int) -> str:
    return "samples.jsonl" if world == 1 else f"samples.rank{rank}-of-{world}.jsonl"


def read_records(path: Path) -> list[dict]:
    """Complete lines of a samples file (a line cut short by a crash is ignored: it is redone)."""
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def all_records(out: Path) -> dict[int, dict]:
    """Finished problems by index, from samples.jsonl and any rank shards."""
    recs = {}
    for path in [out / "samples.jsonl", *sorted(out.glob("samples.rank*-of-*.jsonl"))]:
        for r in read_records(path):
            recs[int(r["index"])] = r
    return recs


def my_share(indices: list[int], rank: int, world: int) -> list[int]:
    """The problems of one rank: every world-th one, so long and short problems spread evenly."""
    return [i for j, i in enumerate(indices) if j % world == rank]


def repair_tail(path: Path) -> None:
    """Drop a partial last line (left by a crash) so appending starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)  # in place: rewriting could lose the file on a failing disk


def merge_shards(out: Path) -> list[dict]:
    """Rank 0: every finished problem into samples.jsonl in data order (atomic), shards removed."""
    recs = all_records(out)
    merged = [recs[i] for i in sorted(recs)]
    fsio.atomic_write(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in merged), hint=RESUME_HINT)
    for shard in out.glob("samples.rank*-of-*.jsonl"):
        shard.unlink()
    return merged


def add_timing(out: Path, seconds: float, tokens: int) -> dict:
    """Accumulate sampling time and generated tokens over sessions (for tokens/s of a resumed run)."""
    path = out / "timing.json"
    t = {"seconds": 0.0, "generated_tokens": 0}
    if path.is_file():
        try:
            t.update(json.loads(path.read_text()))
        except json.JSONDecodeError:
            pass
    t["seconds"] += seconds
    t["generated_tokens"] += int(tokens)
    fsio.atomic_write(path, json.dumps(t), hint=RESUME_HINT)
    return t


# ----------------------------------------------------------------------------------------------------------
# report


def plot_pass_at_k(summary: dict, path: Path, title: str = "") -> Path:
    """Pass@k against k (log2 axis), with PassRatio, majority vote and greedy accuracy for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in summary["pass_at_k"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ks, [100 * summary["pass_at_k"][str(k)] for k in ks], "o-", label="Pass@k")
    ax.axhline(100 * summary["pass_ratio"], color="C1", ls="--", label=f"PassRatio@{summary['n']}")
    ax.axhline(100 * summary["majority_accuracy"], color="C2", ls=":", label="majority vote")
    if summary.get("greedy_accuracy") is not None:
        ax.axhline(100 * summary["greedy_accuracy"], color="C3", ls="-.", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    ax.set_title(title or f"{summary['problems']} problems, n={summary['n']}")
    fig.tight_layout()
    try:
        with fsio.atomic_open(path, "wb", hint=RESUME_HINT) as f:  # the old plot or a whole new one, never half a PNG
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return path


def format_table(summary: dict) -> str:
    """The short table printed at the end of `fastmath sample`."""
    n = summary["n"]
    rows = [("problems", str(summary["problems"])), ("samples per problem", str(n))]
    for k in sorted(int(k) for k in summary["pass_at_k"]):
        if k in (1, n) or k in (8, 64):
            rows.append((f"Pass@{k}", f"{100 * summary['pass_at_k'][str(k)]:.1f}%"))
    guess = summary.get("guessing_baseline")
    if guess and str(n) in guess["pass_at_k"]:
        rows.append((f"Pass@{n} by guessing (floor)", f"{100 * guess['pass_at_k'][str(n)]:.1f}%"))
    rows.append((f"PassRatio@{n}", f"{100 * summary['pass_ratio']:.1f}%"))
    rows.append(("majority vote", f"{100 * summary['majority_accuracy']:.1f}%"))
    g = summary.get("greedy_accuracy")
    rows.append(("greedy (first answer)", "-" if g is None else f"{100 * g:.1f}%"))
    rows.append(("no answer", f"{100 * summary.get('no_answer_rate', 0):.1f}%"))
    rows.append(("generated tokens", f"{summary['generated_tokens']:,}"))
    if summary.get("tokens_per_second"):
        rows.append(("tokens/s", f"{summary['tokens_per_second']:,.0f}"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b:>10}" for a, b in rows)

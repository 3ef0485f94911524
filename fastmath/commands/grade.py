"""`fastmath grade SAMPLES.jsonl`: re-grade a samples file and write summary.json (no torch)."""
import json
from pathlib import Path

import click

# Key names accepted for files written by other engines (first present wins).
COMPLETION_KEYS = ("completions", "responses", "outputs", "generations", "samples", "predictions")
REFERENCE_KEYS = ("reference_answer", "answer", "gt", "ground_truth", "target", "reference", "solution")
ID_KEYS = ("id", "idx", "problem_id", "unique_id", "index")
QUESTION_KEYS = ("question", "problem", "prompt", "query")
TOKEN_KEYS = ("token_counts", "num_tokens", "output_lengths")
NO_ANSWER_HINT = 0.2  # above this share of missing answers, strict grading suggests --extract flexible


def _first(rec, keys):
    for k in keys:
        if k in rec and rec[k] is not None:
            return k, rec[k]
    return None, None


def _text(c):
    """A completion given as a string or as an object with a text field (vLLM/OpenAI-style)."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        for k in ("text", "content", "completion", "output"):
            if isinstance(c.get(k), str):
                return c[k]
        msg = c.get("message")
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            return msg["content"]
    raise ValueError("a completion is neither a string nor an object with a 'text' field")


def read_problem(rec):
    """Turn one parsed JSON line into (id, question, reference, completions, token_counts, extras).
    Raises ValueError with a short reason when the line cannot be graded."""
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    key, comps = _first(rec, COMPLETION_KEYS)
    if key is None:
        raise ValueError(f"no completions (expected one of: {', '.join(COMPLETION_KEYS)})")
    if not isinstance(comps, list) or not comps:
        raise ValueError(f"'{key}' must be a non-empty list")
    comps = [_text(c) for c in comps]
    key, ref = _first(rec, REFERENCE_KEYS)
    if key is None:
        raise ValueError(f"no reference answer (expected one of: {', '.join(REFERENCE_KEYS)})")
    if isinstance(ref, (int, float)) and not isinstance(ref, bool):
        ref = str(ref)
    if not isinstance(ref, str):
        raise ValueError(f"'{key}' must be a string or a number")
    _, tokens = _first(rec, TOKEN_KEYS)
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != len(comps)
                               or not all(isinstance(t, int) and t >= 0 for t in tokens)):
        raise ValueError("token counts must be a list of non-negative integers, one per completion")
    return rec, comps, ref, tokens


@click.command(name="grade")
@click.argument("samples", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the summary JSON. Default: summary.json beside SAMPLES (an existing one keeps its seconds and run settings).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Worker processes for the symbolic (sympy) slow path of answer equivalence.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=3.0, show_default=True,
              help="Seconds per symbolic comparison before it is abandoned (graded as not equal).")
@click.option("--extract", type=click.Choice(["strict", "flexible"]), default="strict", show_default=True,
              help="Answer extraction: strict takes only marked answers (\"The answer is\", ####, \\boxed{}, "
                   "\"Final answer:\"); flexible falls back to the last number or $...$ span when there is none.")
def command(samples, out, workers, timeout, extract):
    """Re-grade SAMPLES.jsonl and write the same summary.json as `fastmath sample`.

    SAMPLES holds one JSON object per problem: fastmath's own samples.jsonl, or another engine's output with
    a list of completions (key completions/responses/outputs/generations/samples/predictions; strings or
    objects with a "text" field) and a reference (reference_answer/answer/gt/ground_truth/target/reference/
    solution; a full GSM8K or MATH solution is fine, its final answer is extracted). Optional keys: id,
    question/problem, token_counts/num_tokens, greedy_completion, greedy_token_count, type, level.
    Malformed lines are reported by line number and skipped; the rest is graded.
    """
    from tqdm import tqdm

    from fastmath.grading import Grader
    from fastmath.metrics import grade_problem, summarize, validate

    out = out or samples.parent / "summary.json"
    problems, bad = [], []
    with open(samples, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                problems.append((lineno, *read_problem(json.loads(line))))
            except (ValueError, TypeError) as e:
                reason = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                bad.append(lineno)
                click.echo(f"{samples}:{lineno}: {reason}; line skipped", err=True)
    if not problems:
        raise click.ClickException(f"{samples}: no gradable lines ({len(bad)} malformed)")

    grader = Grader(workers=workers, timeout=timeout)
    records, has_tokens = [], True
    try:
        for lineno, rec, comps, ref, tokens in tqdm(problems, desc="grading", unit="problem"):
            graded = grade_problem(comps, ref, rec.get("greedy_completion"), grader=grader, extract=extract)
            graded["token_counts"] = tokens if tokens is not None else []
            has_tokens &= tokens is not None
            if isinstance(rec.get("greedy_token_count"), int):
                graded["greedy_token_count"] = rec["greedy_token_count"]
            for field in ("type", "level"):
                if rec.get(field) is not None:
                    graded[field] = rec[field]
            records.append(graded)
    finally:
        grader.close()

    previous = {}
    if out.exists():  # re-grading fastmath's own output in place keeps the sampling run's timing and settings
        try:
            previous = json.loads(out.read_text())
        except (ValueError, OSError):
            previous = {}
        previous = previous if isinstance(previous, dict) else {}
    summary = summarize(records, seconds=previous.get("seconds"))
    summary["malformed_lines"] = bad
    summary["extract"] = extract
    for key, value in previous.items():  # e.g. model, data, temperature written by `fastmath sample`
        summary.setdefault(key, value)
    validate(summary, "summary")
    out.parent.mkdir(parents=True, exist_ok=True)
    from fastmath.fsio import atomic_write

    atomic_write(out, json.dumps(summary, indent=2) + "\n")  # the old summary or the new one, never a part

    n = summary["n"]
    click.echo(f"{summary['problems']} problems x {n} samples ({len(bad)} malformed lines skipped)")
    rows = [(f"pass@{k}", v) for k, v in summary["pass_at_k"].items()]
    rows += [(f"passratio@{n}", summary["pass_ratio"]), ("majority", summary["majority_accuracy"])]
    if summary["greedy_accuracy"] is not None:
        rows.append(("greedy", summary["greedy_accuracy"]))
    rows.append(("no answer", summary["no_answer_rate"]))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {100 * value:6.2f}%")
    if extract == "strict" and summary["no_answer_rate"] > NO_ANSWER_HINT:
        click.echo(f"hint: {100 * summary['no_answer_rate']:.0f}% of the completions have no marked answer; "
                   "if the model does not write one, try --extract flexible")
    if not has_tokens:
        click.echo("(no token counts in the input: generated_tokens counts only the lines that had them)")
    click.echo(f"wrote {out}")

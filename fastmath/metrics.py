"""Metrics of N-sample evaluation (the paper's Pass@k and PassRatio@N, greedy and majority-vote accuracy)
and the samples.jsonl / summary.json formats. Pure Python; no torch.

Contract used by the sampler (`fastmath sample`), `fastmath grade` and the reproduction script:

    grade_problem(completions, reference_answer, greedy_completion=None, grader=None, extract="strict") -> dict
        keys: reference_answer (extracted when a full solution was given), extracted_answers [str|None],
        verdicts [bool], num_correct, majority_answer (str|None), majority_count, majority_correct,
        no_answer; and greedy_extracted_answer, greedy_correct when greedy_completion is given.
    problem_record(id, question, reference_answer, completions, token_counts, greedy_completion=None,
                   greedy_token_count=None, type=None, level=None, grader=None, **extra) -> dict
        one samples.jsonl line (grade_problem's keys plus the inputs), valid for validate(.., "samples").
    summarize(records, n=None, seconds=None, generated_tokens=None) -> dict
        summary.json from a list of such records (only the keys above are read), valid for "summary".
    validate(obj, "samples" | "summary")   raises ValueError naming the first schema violation.
    pass_at_k(n, c, k), pass_ks(n), majority_vote(answers, equiv)

samples.jsonl, one JSON object per problem (schema: fastmath/schemas/samples.schema.json):
    id, question, reference_answer, completions [str], extracted_answers [str|null], verdicts [bool],
    token_counts [int], num_correct, majority_answer, majority_correct; optional greedy_completion,
    greedy_extracted_answer, greedy_correct, greedy_token_count, type, level, and any extra keys.
summary.json (schema: fastmath/schemas/summary.schema.json):
    n, problems, pass_at_k {"1": .., "2": .., "4": .., ..., str(n): ..}, pass_ratio, majority_accuracy,
    greedy_accuracy (null without greedy samples), no_answer_rate, generated_tokens, seconds (or null),
    tokens_per_second (or null), breakdowns {"type": {value: {...}}, "level": {...}} where each entry has
    problems, pass_at_1, pass_at_n, pass_ratio, majority_accuracy, greedy_accuracy; guessing_baseline
    {pass_at_k, problems, source} when at least two problems carry a reference answer.
All accuracies are fractions in [0, 1].
"""
import json
from collections import Counter, defaultdict
from importlib import resources

from .grading import Grader, default_grader, extract_answer, normalize_answer

BREAKDOWN_FIELDS = ("type", "level")
MAX_VOTE_COMPARISONS = 20_000  # per problem; beyond it remaining answers are grouped by string only


def pass_at_k(n, c, k):
    """Unbiased Pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms huge binomials (Chen et al. 2021).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(n):
    """The k values reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_vote(answers, equiv):
    """The winning equivalence class of `answers` (None entries do not vote).

    Answers are grouped by exact string first; distinct strings then join the first earlier class whose
    representative (its first answer) `equiv(answer, representative)` holds. The largest class wins; a tie
    goes to the class whose first answer appears earliest in `answers` (deterministic).
    Returns (index of the winning class's first answer, class size), or (None, 0) when nobody answered.
    """
    first = {}
    counts = defaultdict(int)
    for k, a in enumerate(answers):
        if a is None:
            continue
        if a not in first:
            first[a] = k
        counts[a] += 1
    if not first:
        return None, 0
    reps = []  # [first index, size]
    budget = MAX_VOTE_COMPARISONS
    for a in sorted(first, key=first.get):
        joined = False
        for cls in reps:
            if budget <= 0:
                break
            budget -= 1
            if equiv(a, answers[cls[0]]):
                cls[1] += counts[a]
                joined = True
                break
        if not joined:
            reps.append([first[a], counts[a]])
    best = max(reps, key=lambda cls: (cls[1], -cls[0]))
    return best[0], best[1]


def _looks_like_solution(text):
    return "\\boxed" in text or "\\fbox" in text or "####" in text or "answer is" in text.lower()


def grade_problem(completions, reference_answer, greedy_completion=None, grader=None, extract="strict"):
    """Extract and grade the answers of one problem's completions; see the module docstring for the keys.

    `reference_answer` may be the final answer ("18", "\\frac{1}{2}") or a full reference solution
    (GSM8K "... #### 18", MATH "... \\boxed{...}"), whose final answer is then extracted (always strictly).
    `extract` is extract_answer's mode for the completions: "strict" or "flexible".
    """
    grader = grader or default_grader()
    ref = reference_answer
    if isinstance(ref, (int, float)):
        ref = str(ref)
    if isinstance(ref, str) and _looks_like_solution(ref):
        ref = extract_answer(ref) or ref
    answers = [extract_answer(c, extract) for c in completions]
    verdicts = grader.equiv_many([(a, ref) for a in answers]) if ref else [False] * len(answers)
    verdicts = [bool(a is not None and v) for a, v in zip(answers, verdicts)]

    def vote_equiv(a, b):
        return grader.equiv(a, b)

    idx, count = majority_vote(answers, vote_equiv)
    out = {
        "reference_answer": ref,
        "extracted_answers": answers,
        "verdicts": verdicts,
        "num_correct": sum(verdicts),
        "majority_answer": answers[idx] if idx is not None else None,
        "majority_count": count,
        "majority_correct": bool(idx is not None and verdicts[idx]),
        "no_answer": sum(a is None for a in answers),
    }
    if greedy_completion is not None:
        g = extract_answer(greedy_completion, extract)
        out["greedy_extracted_answer"] = g
        out["greedy_correct"] = bool(g is not None and ref and grader.equiv(g, ref))
    return out


def problem_record(id, question, reference_answer, completions, token_counts, greedy_completion=None,
                   greedy_token_count=None, type=None, level=None, grader=None, **extra):
    """One samples.jsonl line: the inputs plus grade_problem's results (schema "samples")."""
    if len(token_counts) != len(completions):
        raise ValueError(f"problem {id}: {len(completions)} completions but {len(token_counts)} token counts")
    rec = {"id": id, "question": question}
    graded = grade_problem(completions, reference_answer, greedy_completion, grader=grader)
    rec["reference_answer"] = graded.pop("reference_answer")
    rec["completions"] = list(completions)
    rec["token_counts"] = [int(t) for t in token_counts]
    rec.update(graded)
    if greedy_completion is not None:
        rec["greedy_completion"] = greedy_completion
        if greedy_token_count is not None:
            rec["greedy_token_count"] = int(greedy_token_count)
    if type is not None:
        rec["type"] = type
    if level is not None:
        rec["level"] = level
    rec.update(extra)
    return rec


def _group_metrics(records, ks):
    """Pass@k for each k, PassRatio, majority and greedy accuracy over a list of graded records."""
    m = len(records)
    out = {}
    out["pass_at_k"] = {str(k): sum(pass_at_k(len(r["verdicts"]), r["num_correct"], k) for r in records) / m
                        for k in ks}
    out["pass_ratio"] = sum(r["num_correct"] / len(r["verdicts"]) for r in records) / m
    out["majority_accuracy"] = sum(bool(r["majority_correct"]) for r in records) / m
    greedy = [r["greedy_correct"] for r in records if "greedy_correct" in r]
    out["greedy_accuracy"] = sum(map(bool, greedy)) / len(greedy) if greedy else None
    return out


def summarize(records, n=None, seconds=None, generated_tokens=None):
    """summary.json for graded problem records (schema "summary").

    Args:
        records: dicts with at least verdicts, num_correct, majority_correct (and optionally
            greedy_correct, token_counts, greedy_token_count, extracted_answers, type, level).
        n: samples per problem; default: the smallest number of verdicts of any record. Pass@k is
            reported for pass_ks(n), each problem using its own sample count (>= k) in the estimator.
        seconds: wall time of the sampling run (tokens_per_second is null without it).
        generated_tokens: default: the sum of token_counts and greedy_token_count over records.
    """
    records = list(records)
    if not records:
        raise ValueError("summarize needs at least one graded problem")
    counts = [len(r["verdicts"]) for r in records]
    if min(counts) == 0:
        raise ValueError("every problem needs at least one sample")
    n = min(counts) if n is None else int(n)
    if n > min(counts):
        raise ValueError(f"n={n} but a problem has only {min(counts)} samples")
    ks = pass_ks(n)
    summary = {"n": n, "problems": len(records)}
    summary.update(_group_metrics(records, ks))
    answered = sum(len(r.get("extracted_answers", [])) for r in records)
    missing = sum(sum(a is None for a in r.get("extracted_answers", [])) for r in records)
    summary["no_answer_rate"] = missing / answered if answered else 0.0
    if generated_tokens is None:
        generated_tokens = sum(sum(r.get("token_counts", [])) + r.get("greedy_token_count", 0) for r in records)
    summary["generated_tokens"] = int(generated_tokens)
    summary["seconds"] = float(seconds) if seconds is not None else None
    summary["tokens_per_second"] = generated_tokens / seconds if seconds else None
    breakdowns = {}
    for field in BREAKDOWN_FIELDS:
        groups = defaultdict(list)
        for r in records:
            if r.get(field) is not None:
                groups[str(r[field])].append(r)
        if groups:
            breakdowns[field] = {}
            for value in sorted(groups):
                g = _group_metrics(groups[value], [1, n])
                breakdowns[field][value] = {
                    "problems": len(groups[value]), "pass_at_1": g["pass_at_k"]["1"],
                    "pass_at_n": g["pass_at_k"][str(n)], "pass_ratio": g["pass_ratio"],
                    "majority_accuracy": g["majority_accuracy"], "greedy_accuracy": g["greedy_accuracy"],
                }
    summary["breakdowns"] = breakdowns
    baseline = guessing_baseline([r.get("reference_answer") for r in records], ks)
    if baseline is not None:
        summary["guessing_baseline"] = baseline
    return summary


def guessing_baseline(reference_answers, ks):
    """Pass@k of a guesser that answers each problem with k independent draws from the reference answers of
    the other problems (leave-one-out frequencies, compared by `normalize_answer`): the floor against which
    Pass@k must be read when answers repeat (small integers, multiple choice). String equality makes it a
    slight underestimate ("0.5" and "\\frac{1}{2}" count as different). None with fewer than two references.
    """
    keys = [normalize_answer(a) for a in reference_answers if isinstance(a, str) and a.strip()]
    m = len(keys)
    if m < 2:
        return None
    counts = Counter(keys)
    hit = [(counts[key] - 1) / (m - 1) for key in keys]  # chance one draw from the others is this answer
    return {"pass_at_k": {str(k): sum(1.0 - (1.0 - p) ** k for p in hit) / m for k in ks}, "problems": m,
            "source": "k draws from the other problems' reference answers (leave-one-out frequencies)"}


_SCHEMAS = {}


def schema(name):
    """The JSON Schema dict for "samples" (one samples.jsonl line) or "summary" (summary.json)."""
    if name not in ("samples", "summary"):
        raise ValueError(f"unknown schema {name!r}; expected 'samples' or 'summary'")
    if name not in _SCHEMAS:
        text = resources.files("fastmath").joinpath("schemas", f"{name}.schema.json").read_text()
        _SCHEMAS[name] = json.loads(text)
    return _SCHEMAS[name]


def validate(obj, name, optional: bool = False) -> bool:
    """Raise ValueError with the first violation of schema `name` ("samples" or "summary").

    optional: for records fastmath wrote itself, return False instead of failing when jsonschema is not
    installed (a --no-deps install); input from elsewhere is always checked. Returns True when checked.
    """
    try:
        import jsonschema
    except ImportError:
        if optional:
            return False
        raise

    validator = jsonschema.Draft202012Validator(schema(name))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"{name} record invalid at {where}: {e.message}")
    if name == "samples":
        k = len(obj["completions"])
        for key in ("extracted_answers", "verdicts", "token_counts"):
            if len(obj[key]) != k:
                raise ValueError(f"samples record invalid: {len(obj[key])} {key} for {k} completions")
    if name == "summary":
        expected = [str(k) for k in pass_ks(obj["n"])]
        if sorted(obj["pass_at_k"], key=int) != expected:
            raise ValueError(f"summary invalid: pass_at_k keys {sorted(obj['pass_at_k'], key=int)}, "
                             f"expected {expected}")
    return True


__all__ = ["pass_at_k", "pass_ks", "majority_vote", "grade_problem", "problem_record", "summarize",
           "schema", "validate", "Grader"]

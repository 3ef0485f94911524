"""bench/repro_paper.py end to end in quick mode on tiny sizes; every metric in its results is recomputed here
from the written samples files (fastmath.grading verdicts, exact binomial Pass@k, majority vote, a grid-search
fit of p, the guessing floor from the answer counts, the error classes by re-doing each written step's
arithmetic), independently of the script's own aggregation."""
import importlib.util
import json
import math
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fastmath import grading, metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "repro_paper.py"


def _script():
    spec = importlib.util.spec_from_file_location("repro_paper", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repro_paper"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _path(p: str) -> Path:
    """A path written in the results: relative to the repository root, or absolute."""
    return Path(p) if Path(p).is_absolute() else REPO / p


def _grid_fit(by_steps: dict) -> float:
    """Brute-force maximum-likelihood p of accuracy = p^steps on a fine grid (reference for the script's search)."""
    pts = [(int(s), v["correct"], v["problems"]) for s, v in by_steps.items()]
    best, best_ll = 0.0, -math.inf
    for i in range(0, 100001):
        p = i / 100000
        ll = 0.0
        for s, c, n in pts:
            q = p ** s
            if (c and q == 0.0) or (n - c and q == 1.0):
                ll = -math.inf
                break
            ll += (c * math.log(q) if c else 0.0) + ((n - c) * math.log(1 - q) if n - c else 0.0)
        if ll > best_ll:
            best, best_ll = p, ll
    return best


def test_fit_single_step_matches_grid_search():
    fit = _script().fit_single_step
    rng = random.Random(0)
    for _ in range(5):
        by = {}
        for s in range(1, 6):
            n = rng.randint(3, 30)
            by[str(s)] = {"problems": n, "correct": rng.randint(0, n)}
        assert fit(by) == pytest.approx(_grid_fit(by), abs=2e-5)
    assert fit({"1": {"problems": 4, "correct": 4}, "3": {"problems": 2, "correct": 2}}) == 1.0
    assert fit({"2": {"problems": 4, "correct": 0}}) == 0.0
    # One step count alone: the fit is the p whose power equals the observed accuracy.
    assert fit({"2": {"problems": 100, "correct": 49}}) == pytest.approx(0.7, abs=1e-6)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    results = tmp / "results"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--work-dir", str(tmp / "work"), "--results", str(results),
           # Tiny sizes and an easy difficulty, so that a 2-layer model answers some problems within a minute
           # (start values up to 20, so that the answers are not all alike).
           "--difficulty", "min_steps=1 max_steps=2 max_operand=9 max_start=20 max_value=40 ops=add style=terse",
           "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--pretrain-examples", "1500",
           "--pretrain-epochs", "2", "--batch-tokens", "1024", "--sizes", "60,120", "--sft-lr", "1e-3",
           "--problems", "12", "-n", "12", "--max-new-tokens", "48",
           "--no-table1"]  # tests/test_repro_table1.py runs the Table-1 stage against a scripted teacher
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((results / "repro_paper.json").read_text()), results


def test_quick_run_writes_results_and_figures(quick_run):
    out, results = quick_run
    assert out["mode"] == "quick"
    assert [r["sft_examples"] for r in out["runs"]] == [60, 120]
    for name in ("repro_paper_scaling.png", "repro_paper_steps.png", "repro_paper_errors.png"):
        data = (results / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    table = (results / "repro_paper.md").read_text()
    assert table.count("\n60 |") == 2 and table.count("\n120 |") == 2  # the scaling table and the error table
    assert "guessing (floor)" in table
    assert out["base_model"]["cached"] is False and out["base_model"]["train"]["steps"] > 0


def test_every_metric_recomputed_from_samples(quick_run):
    out, _ = quick_run
    n = out["settings"]["n"]
    heldout = {}
    for line in _path(out["heldout_file"]).read_text().splitlines():
        rec = json.loads(line)
        heldout[rec["id"]] = rec
    assert len(heldout) == out["settings"]["problems"]
    any_correct = 0
    for run in out["runs"]:
        metrics.validate(run, "summary")  # each run carries the grading schema's summary fields
        recs = [json.loads(x) for x in _path(run["samples_file"]).read_text().splitlines()]
        assert sorted(r["id"] for r in recs) == sorted(heldout)
        pass_k = {k: 0.0 for k in metrics.pass_ks(n)}
        ratio = maj = greedy = 0.0
        by_steps = {}
        for r in recs:
            gold = heldout[r["id"]]["answer"]
            assert len(r["completions"]) == n
            verdicts = []
            for text in r["completions"]:
                a = grading.extract_answer(text)
                verdicts.append(a is not None and grading.is_equiv(a, gold))
            assert verdicts == r["verdicts"], r["id"]
            c = sum(verdicts)
            any_correct += c
            for k in pass_k:  # exact binomial form of the unbiased estimator
                pass_k[k] += 1 - math.comb(n - c, k) / math.comb(n, k)
            ratio += c / n
            answers = [grading.extract_answer(t) for t in r["completions"]]
            idx, _ = metrics.majority_vote(answers, grading.is_equiv)
            maj += idx is not None and verdicts[idx]
            g = grading.extract_answer(r["greedy_completion"])
            g_ok = g is not None and grading.is_equiv(g, gold)
            greedy += g_ok
            s = str(heldout[r["id"]]["steps"])
            by_steps.setdefault(s, {"problems": 0, "correct": 0})
            by_steps[s]["problems"] += 1
            by_steps[s]["correct"] += int(g_ok)
        m = len(recs)
        assert run["problems"] == m and run["n"] == n
        for k, v in pass_k.items():
            assert run["pass_at_k"][str(k)] == pytest.approx(v / m, abs=1e-9)
        assert run["pass_ratio"] == pytest.approx(ratio / m, abs=1e-12)
        assert run["majority_accuracy"] == pytest.approx(maj / m, abs=1e-12)
        assert run["greedy_accuracy"] == pytest.approx(greedy / m, abs=1e-12)
        assert {s: (v["problems"], v["correct"]) for s, v in run["greedy_by_steps"].items()} == \
               {s: (v["problems"], v["correct"]) for s, v in by_steps.items()}
        for s, v in run["greedy_by_steps"].items():
            assert v["accuracy"] == pytest.approx(v["correct"] / v["problems"])
        assert run["single_step_accuracy"] == pytest.approx(_grid_fit(by_steps), abs=2e-5)
    assert any_correct > 0, "the tiny models answered nothing: the recomputation above checked only zeros"


def _heldout(out):
    return {r["id"]: r for r in (json.loads(x) for x in _path(out["heldout_file"]).read_text().splitlines())}


def test_guessing_floor_and_targets_recomputed(quick_run):
    out, _ = quick_run
    n = out["settings"]["n"]
    answers = [r["answer"] for r in _heldout(out).values()]
    m, counts = len(answers), Counter(answers)
    for k in (1, n):  # leave-one-out: k draws from the other problems' answers
        want = sum(1 - (1 - (counts[a] - 1) / (m - 1)) ** k for a in answers) / m
        assert out["guessing_floor"][f"pass_at_{k}"] == pytest.approx(want, abs=1e-12)
    assert out["guessing_floor"]["distinct_answers"] == len(counts)
    for run in out["runs"]:  # the floor each summary.json carries is the same one
        assert run["guessing_baseline"]["pass_at_k"][str(n)] == pytest.approx(out["guessing_floor"][f"pass_at_{n}"])
    first, runs = out["runs"][0], out["runs"]
    t = out["targets"]
    assert t["guessing_floor_at_most_25pct"] == (out["guessing_floor"][f"pass_at_{n}"] <= 0.25)
    assert t[f"smallest_pass_at_{n}_at_least_60pct"] == (first["pass_at_k"][str(n)] >= 0.6)
    assert t["smallest_pass_ratio_at_most_a_third_of_pass"] == (3 * first["pass_ratio"] <= first["pass_at_k"][str(n)])
    for key in ("pass_ratio", "majority_accuracy", "greedy_accuracy"):
        v = [r[key] for r in runs]
        assert t[f"{key}_rises_with_data"] == (all(b >= a for a, b in zip(v, v[1:])) and v[-1] > v[0])


def _reference_class(text, answer):
    """Independent classifier: the grader's final answer, then each `a op b = c` on the lines before the last
    "The answer is" line, found by a token window (not a regex), checked with exact integer arithmetic."""
    final = grading.extract_answer(text)
    if final is None or not re.fullmatch(r"-?\d+", final.strip()):
        return "no_answer"
    final = int(final)
    assert final != int(answer)
    lines = text.split("\n")
    last = max([i for i, line in enumerate(lines) if re.search("the (final )?answer is", line, re.I)], default=len(lines))
    steps = []
    for line in lines[:last]:
        tok = line.replace(":", " ").split()
        for i in range(len(tok) - 4):
            a, op, b, eq, c = tok[i:i + 5]
            c = c.rstrip(".")
            if op in "+-*/" and eq == "=" and all(re.fullmatch(r"-?\d+", x) for x in (a, b, c)):
                steps.append((int(a), op, int(b), int(c)))
    exact = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
             "/": lambda a, b: a // b if b and a % b == 0 else None}
    if any(exact[op](a, b) != c for a, op, b, c in steps) or (steps and steps[-1][3] != final):
        return "calculation"
    return "reasoning"


def test_error_classes_recomputed_from_samples(quick_run):
    out, _ = quick_run
    heldout = _heldout(out)
    total_wrong = 0
    for run in out["runs"]:
        want = {"samples": Counter(), "greedy": Counter()}
        n_all = {"samples": 0, "greedy": 0}
        for line in _path(run["samples_file"]).read_text().splitlines():
            rec = json.loads(line)
            h = heldout[rec["id"]]
            pairs = [("samples", t, ok) for t, ok in zip(rec["completions"], rec["verdicts"])]
            pairs.append(("greedy", rec["greedy_completion"], rec["greedy_correct"]))
            for which, text, ok in pairs:
                n_all[which] += 1
                if not ok:
                    want[which][_reference_class(text, h["answer"])] += 1
        for which in ("samples", "greedy"):
            got = run["errors"][which]
            assert got["total"] == n_all[which] and got["unclassified"] == 0
            assert got["wrong"] == sum(want[which].values())
            assert {c: got[c] for c in ("calculation", "reasoning", "no_answer")} == \
                   {c: want[which][c] for c in ("calculation", "reasoning", "no_answer")}
            assert sum(got["reasoning_kinds"].values()) == got["reasoning"]
        total_wrong += run["errors"]["samples"]["wrong"]
    assert total_wrong > 0

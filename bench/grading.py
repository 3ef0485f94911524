"""Grading throughput and accuracy: fastmath (cache on / off) vs math-verify.

256 samples x the 1,000 MATH test problems of ../shared/data. Each problem's samples are drawn (skewed, like
a model's answers) from a pool built from its reference answer: rewrites that must grade equal (\\dfrac,
spacing, \\left/\\right, $...$, decimal <-> fraction, thousands separators, a symbolic 2(x)/2) and near
misses that cannot (value + 1, 10x + 1, an extra tuple element, other text). Reports comparisons/s of
fastmath with the verdict cache on and off, the cache hit rate, math-verify's comparisons/s (on a random
subset of the same pairs: it is ~4 ms per pair), and each grader's accuracy against the labels.

    .venv/bin/python bench/grading.py [--problems 1000] [--samples 256] [--mv-pairs 3000] [--workers 2]

Writes bench/results/grading.json and grading.md (or $FASTMATH_BENCH_OUT).

    .venv/bin/python bench/grading.py --baseline main [--repeats 3]

instead times this checkout's grader against fastmath/grading.py + _latex.py of git commit `main`, loaded side
by side from a temporary folder, in the same process on the same pairs, alternating old and new runs (their
median is reported; the sympy worker processes, 0.04% of the pairs, are this checkout's for both). Writes
grading_baseline.json and grading_baseline.md.
"""
import argparse
import datetime
import json
import os
import platform
import random
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "math_test_1000.jsonl"


def exact(ans):
    """Value of an integer / decimal / \\frac{a}{b} answer, else None (bench-local, independent of fastmath)."""
    plain = ans.replace(",\\!", "").replace("{,}", "").strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", plain):
        return Fraction(plain)
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", plain)
    if m and int(m.group(3)):
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    return None


def decimal(q):
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    digits = 0
    while (q * 10**digits).denominator != 1:
        digits += 1
    return f"{float(q):.{digits}f}"


def pool(ref):
    """[(answer, label)] for one reference answer."""
    eq = {f"${ref}$", ref.replace("\\frac", "\\dfrac"), re.sub(r"([+=]|\\cdot)", r" \1 ", ref), f" {ref} "}
    if "\\left" not in ref:
        eq.add(ref.replace("(", "\\left(").replace(")", "\\right)"))
    q = exact(ref)
    miss = set()
    if q is not None:
        eq.add(f"\\frac{{{q.numerator}}}{{{q.denominator}}}" if q.denominator != 1 else f"{q.numerator}.0")
        if q.denominator != 1 and decimal(q):
            eq.add(decimal(q))
        if q.denominator == 1 and abs(q) >= 1000:
            eq.add(f"{q.numerator:,}")
        miss |= {str(q + 1) if q.denominator == 1 else f"\\frac{{{q.numerator + q.denominator}}}{{{q.denominator}}}",
                 str(10 * q + 1) if q.denominator == 1 else f"{float(q) + 0.5:g}"}
    elif "\\text" in ref:
        miss.add("\\text{something else}")
    elif ref.startswith(("(", "[", "\\left")) and "," in ref:
        miss.add(ref.rstrip()[:-1] + ",0" + ref.rstrip()[-1])
    elif not any(c in ref for c in (",", "=", "_", "\\begin", "\\cup", "\\infty")):
        eq.add(f"\\frac{{2\\left({ref}\\right)}}{{2}}")
        miss |= {f"{ref}+1", f"2\\left({ref}\\right)+1"}
    eq.discard(ref)
    return [(ref, True)] + [(a, True) for a in sorted(eq)] + [(a, False) for a in sorted(miss)]


def make_pairs(refs, samples, seed):
    rng = random.Random(seed)
    problems = []
    for ref in refs:
        cands = pool(ref)
        weights = [0.5 ** k for k in range(len(cands))]
        rng.shuffle(weights)  # skewed: a few answers dominate, as with a model's 256 samples
        picks = rng.choices(cands, weights=weights, k=samples)
        problems.append((ref, picks))
    return problems


def load_baseline(ref):
    """fastmath/grading.py and _latex.py of git commit `ref`, imported as the package fastmath_base."""
    import importlib
    import subprocess
    import tempfile

    pkg = Path(tempfile.mkdtemp(prefix="fastmath_base_")) / "fastmath_base"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("grading.py", "_latex.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:fastmath/{name}"], capture_output=True,
                              text=True, check=True).stdout
        (pkg / name).write_text(text)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("fastmath_base.grading")


def run_fastmath(problems, cache, workers, grading=None):
    if grading is None:
        import fastmath.grading as grading
    Grader = grading.Grader

    g = Grader(workers=workers, cache=cache)
    g.equiv("\\sqrt{8}", "2\\sqrt{2}")  # start the worker pool outside the timing
    g.stats.update(calls=0, cache_hits=0, slow=0)
    g.verdicts.clear()
    if g.comparer.parse_cache is not None:
        g.comparer.parse_cache.clear()
    verdicts = []
    t, cpu = time.perf_counter(), time.process_time()
    for ref, picks in problems:  # one call per problem, as the sampler does
        verdicts += g.equiv_many([(a, ref) for a, _ in picks])
    seconds = time.perf_counter() - t
    stats = dict(g.stats, timeouts=g.pool.timeouts, cpu_seconds=time.process_time() - cpu)
    g.close()
    return verdicts, seconds, stats


def run_math_verify(pairs):
    from math_verify import parse, verify

    verdicts = []
    t = time.perf_counter()
    for pred, ref in pairs:
        try:
            verdicts.append(bool(verify(parse(f"${ref}$"), parse(f"${pred}$"))))
        except Exception:
            verdicts.append(False)
    return verdicts, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=1000, help="MATH problems to use (max 1000)")
    ap.add_argument("--samples", type=int, default=256, help="samples per problem")
    ap.add_argument("--mv-pairs", type=int, default=3000, help="random pairs timed with math-verify")
    ap.add_argument("--workers", type=int, default=2, help="fastmath sympy worker processes")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", default=os.environ.get("FASTMATH_BENCH_OUT", str(ROOT / "bench" / "results")),
                    help="output folder")
    ap.add_argument("--baseline", default=None, metavar="REF",
                    help="time this checkout's grader against git commit REF's on the same pairs (no math-verify)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating old/new runs with --baseline")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data/math_test_1000.jsonl")

    from fastmath.grading import extract_answer

    with open(DATA) as f:
        refs = [extract_answer(json.loads(line)["solution"]) for line in f][: args.problems]
    problems = make_pairs(refs, args.samples, args.seed)
    labels = [lab for _, picks in problems for _, lab in picks]
    flat = [(a, ref) for ref, picks in problems for a, _ in picks]
    n = len(flat)
    print(f"{len(problems)} problems x {args.samples} samples = {n} comparisons "
          f"({sum(labels)} labelled equal, {n - sum(labels)} near misses)", flush=True)

    if args.baseline:
        return compare_baseline(args, problems, labels, n)

    res = {}
    for name, cache in (("fastmath_cache", True), ("fastmath_nocache", False)):
        v, sec, stats = run_fastmath(problems, cache, args.workers)
        acc = sum(a == b for a, b in zip(v, labels)) / n
        res[name] = {"seconds": sec, "comparisons_per_second": n / sec, "accuracy": acc, **stats}
        print(f"{name}: {n / sec:,.0f} cmp/s, accuracy {acc:.5f}, {stats}", flush=True)
        res[name]["_verdicts"] = v
    res["fastmath_cache"]["cache_hit_rate"] = res["fastmath_cache"]["cache_hits"] / n

    rng = random.Random(args.seed + 1)
    idx = sorted(rng.sample(range(n), min(args.mv_pairs, n)))
    mv, mv_sec = run_math_verify([flat[i] for i in idx])
    sub_labels = [labels[i] for i in idx]
    res["math_verify"] = {
        "pairs_timed": len(idx), "seconds": mv_sec, "comparisons_per_second": len(idx) / mv_sec,
        "accuracy_on_subset": sum(a == b for a, b in zip(mv, sub_labels)) / len(idx),
    }
    fm_sub = [res["fastmath_nocache"]["_verdicts"][i] for i in idx]
    res["fastmath_nocache"]["accuracy_on_subset"] = sum(a == b for a, b in zip(fm_sub, sub_labels)) / len(idx)
    errors = [(flat[i][0], flat[i][1], sub_labels[k], mv[k]) for k, i in enumerate(idx) if mv[k] != sub_labels[k]]
    fm_errors = sorted({(flat[i][0], flat[i][1], labels[i]) for i, v in enumerate(res["fastmath_nocache"]["_verdicts"])
                        if v != labels[i]})
    for r in ("fastmath_cache", "fastmath_nocache"):
        del res[r]["_verdicts"]
    mv_rate = res["math_verify"]["comparisons_per_second"]
    print(f"math-verify: {mv_rate:,.0f} cmp/s on {len(idx)} pairs, accuracy "
          f"{res['math_verify']['accuracy_on_subset']:.5f}", flush=True)

    import sympy

    try:
        import importlib.metadata as md
        mv_version = md.version("math-verify")
    except Exception:
        mv_version = "?"
    out = {
        "benchmark": "grading", "date": datetime.date.today().isoformat(),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "versions": {"python": platform.python_version(), "sympy": sympy.__version__, "math-verify": mv_version},
        "command": "python bench/grading.py " + " ".join(sys.argv[1:]),
        "problems": len(problems), "samples": args.samples, "comparisons": n, "workers": args.workers,
        "results": res,
        "speedup_vs_math_verify": {"cache": res["fastmath_cache"]["comparisons_per_second"] / mv_rate,
                                   "no_cache": res["fastmath_nocache"]["comparisons_per_second"] / mv_rate},
        "math_verify_errors_on_subset": [list(map(str, e)) for e in errors[:50]],
        "fastmath_errors": [list(map(str, e)) for e in fm_errors[:50]],
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "grading.json").write_text(json.dumps(out, indent=2) + "\n")
    fc, fn, m = res["fastmath_cache"], res["fastmath_nocache"], res["math_verify"]
    md_lines = [
        "# Grading benchmark", "",
        f"{out['date']}, {out['hardware']}, Python {out['versions']['python']}, sympy {out['versions']['sympy']}, "
        f"math-verify {mv_version}. Command: `{out['command']}`.", "",
        f"{len(problems)} MATH problems x {args.samples} samples = {n:,} comparisons of perturbed reference "
        f"answers (labelled equal rewrites and near misses); math-verify timed on {m['pairs_timed']:,} random pairs.",
        "",
        "| grader | comparisons/s | speedup vs math-verify | accuracy |",
        "|---|---:|---:|---:|",
        f"| fastmath, cache on (hit rate {fc['cache_hit_rate']:.1%}) | {fc['comparisons_per_second']:,.0f} | "
        f"{out['speedup_vs_math_verify']['cache']:.0f}x | {fc['accuracy']:.4%} |",
        f"| fastmath, cache off | {fn['comparisons_per_second']:,.0f} | {out['speedup_vs_math_verify']['no_cache']:.1f}x | "
        f"{fn['accuracy']:.4%} (subset {fn['accuracy_on_subset']:.4%}) |",
        f"| math-verify (subset) | {m['comparisons_per_second']:,.0f} | 1x | {m['accuracy_on_subset']:.4%} |",
        "",
        f"fastmath sent {fn['slow']:,} of {n:,} comparisons to the sympy workers without the cache "
        f"({fc['slow']:,} with it); {fn['timeouts']} timed out.",
    ]
    (outdir / "grading.md").write_text("\n".join(md_lines) + "\n")
    print("\n".join(md_lines[6:]))


def compare_baseline(args, problems, labels, n):
    """Old (git REF) against new grading on the same pairs, alternating runs; medians and the ratio."""
    import statistics

    import fastmath.grading as new

    old = load_baseline(args.baseline)
    load = os.getloadavg()
    seconds = {(v, c): [] for v in ("old", "new") for c in ("cache", "nocache")}
    cpu_seconds = {k: [] for k in seconds}  # this process only: less sensitive to other jobs on a shared box
    accuracy = {}
    for rep in range(args.repeats):
        for cache in (False, True):
            for version, module in (("old", old), ("new", new)) if rep % 2 == 0 else (("new", new), ("old", old)):
                v, sec, stats = run_fastmath(problems, cache, args.workers, module)
                key = (version, "cache" if cache else "nocache")
                seconds[key].append(sec)
                cpu_seconds[key].append(stats["cpu_seconds"])
                accuracy[key] = sum(a == b for a, b in zip(v, labels)) / n
                print(f"{version} {key[1]}: {n / sec:,.0f} cmp/s, accuracy {accuracy[key]:.5f}", flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_seconds.items()}
    res = {f"{v}_{c}": {"seconds": seconds[(v, c)], "median_seconds": med[(v, c)],
                        "cpu_seconds": cpu_seconds[(v, c)], "median_cpu_seconds": med_cpu[(v, c)],
                        "comparisons_per_second": n / med[(v, c)], "accuracy": accuracy[(v, c)]}
           for v, c in seconds}
    ratio = {c: med[("old", c)] / med[("new", c)] for c in ("cache", "nocache")}  # new throughput / old
    ratio_cpu = {c: med_cpu[("old", c)] / med_cpu[("new", c)] for c in ("cache", "nocache")}
    out = {
        "benchmark": "grading_baseline", "date": datetime.date.today().isoformat(),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
        "versions": {"python": platform.python_version()}, "baseline": args.baseline,
        "command": "python bench/grading.py " + " ".join(sys.argv[1:]),
        "problems": len(problems), "samples": args.samples, "comparisons": n, "repeats": args.repeats,
        "results": res, "throughput_new_over_old": ratio, "throughput_new_over_old_cpu_time": ratio_cpu,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "grading_baseline.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# Grading throughput: this checkout against " + args.baseline, "",
        f"{out['date']}, {out['hardware']}, Python {platform.python_version()}, load average "
        f"{load[0]:.2f} at start, {out['load_average_at_end'][0]:.2f} at end. Command: `{out['command']}`.", "",
        f"{len(problems)} MATH problems x {args.samples} samples = {n:,} comparisons, the same pairs for both; "
        f"{args.repeats} alternating runs each, median.", "",
        "| grader | old cmp/s | new cmp/s | new / old (wall) | new / old (CPU time) | accuracy old, new |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in ("cache", "nocache"):
        md.append(f"| cache {'on' if c == 'cache' else 'off'} | {n / med[('old', c)]:,.0f} | {n / med[('new', c)]:,.0f} "
                  f"| {ratio[c]:.3f} | {ratio_cpu[c]:.3f} | {accuracy[('old', c)]:.4%}, {accuracy[('new', c)]:.4%} |")
    (outdir / "grading_baseline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[6:]))


if __name__ == "__main__":
    main()

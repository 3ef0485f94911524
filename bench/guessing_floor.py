"""Pass@k of answer guessing on a data set: k draws from the other problems' reference answers
(fastmath.metrics.guessing_baseline, the `guessing_baseline` of every summary.json). It is the floor
that a model's Pass@k has to be read against.

    python bench/guessing_floor.py                      # ../shared/data GSM8K test and MATH (1000)
    python bench/guessing_floor.py my_test.jsonl ...    # any files fastmath reads
Writes bench/results/guessing_floor.json (or $FASTMATH_BENCH_OUT).
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last, not first: the repo's kernels/ must not shadow the `kernels` package transformers imports

from fastmath.data import iter_examples  # noqa: E402
from fastmath.grading import normalize_answer  # noqa: E402
from fastmath.metrics import guessing_baseline  # noqa: E402

DEFAULT = [ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl", ROOT.parent / "shared" / "data" / "math_test_1000.jsonl"]
KS = [1, 8, 64, 256]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="JSONL data files (default: GSM8K test and MATH 1000 in ../shared/data)")
    a = p.parse_args(argv)
    files = a.files or [f for f in DEFAULT if f.is_file()]
    if not files:
        raise SystemExit("no data files given and ../shared/data is absent")
    results = {}
    for f in files:
        refs = [ex.answer for _, _, ex in iter_examples(f)]
        base = guessing_baseline(refs, KS)
        results[f.name] = {"problems": len(refs), "distinct_answers": len({normalize_answer(r) for r in refs}), **(base or {})}
        if base:
            print(f"{f.name}: {len(refs)} problems; guessing Pass@k " +
                  ", ".join(f"@{k} {100 * v:.1f}%" for k, v in base["pass_at_k"].items()))
    out = Path(os.environ.get("FASTMATH_BENCH_OUT", ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "guessing_floor.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

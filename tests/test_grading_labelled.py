"""The hand-labelled (pred, ref) pairs in tests/data/grading_labelled.tsv: fastmath must get every one
right; math-verify's agreement on the same pairs is measured (information, not a requirement)."""
from pathlib import Path

import pytest

from fastmath.grading import Grader

DATA = Path(__file__).resolve().parent / "data" / "grading_labelled.tsv"


def load_labelled():
    rows = []
    for lineno, line in enumerate(DATA.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        label, pred, ref = line.split("\t")
        assert label in ("0", "1"), f"{DATA}:{lineno}: label must be 0 or 1"
        rows.append((label == "1", pred, ref))
    return rows


def test_labelled_set_size_and_balance():
    rows = load_labelled()
    assert len(rows) >= 300
    positives = sum(label for label, _, _ in rows)
    assert 0.3 < positives / len(rows) < 0.8


def fastmath_verdicts(rows):
    g = Grader(workers=2)
    try:
        return g.equiv_many([(p, r) for _, p, r in rows])
    finally:
        g.close()


def test_fastmath_matches_every_label():
    rows = load_labelled()
    got = fastmath_verdicts(rows)
    wrong = [(label, p, r) for (label, p, r), v in zip(rows, got) if v != label]
    assert not wrong, wrong


def test_agreement_with_math_verify():
    mv = pytest.importorskip("math_verify")
    rows = load_labelled()
    ours = fastmath_verdicts(rows)
    theirs = []
    for _, p, r in rows:
        try:
            theirs.append(bool(mv.verify(mv.parse(f"${r}$"), mv.parse(f"${p}$"))))
        except Exception:
            theirs.append(False)
    agree_labels = sum(v == label for v, (label, _, _) in zip(theirs, rows))
    agree_ours = sum(a == b for a, b in zip(ours, theirs))
    print(f"math-verify matches {agree_labels}/{len(rows)} labels; agrees with fastmath on {agree_ours}")
    # information: the two graders agree on the large majority; fastmath is right on all labels
    assert agree_ours >= 0.9 * len(rows)

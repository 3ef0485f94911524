"""Pass@k, PassRatio, majority vote and the summary against brute force and hand computation."""
import itertools
import random
from fractions import Fraction

import pytest

from fastmath.metrics import grade_problem, majority_vote, pass_at_k, pass_ks, problem_record, summarize, validate


def _brute_pass_at_k(verdicts, k):
    """Fraction of all k-subsets of the samples that contain a correct one (exact)."""
    subsets = list(itertools.combinations(range(len(verdicts)), k))
    return Fraction(sum(any(verdicts[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_brute_force(n):
    rng = random.Random(n)
    for c in range(n + 1):
        verdicts = [True] * c + [False] * (n - c)
        rng.shuffle(verdicts)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(verdicts, k)), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(256, 128) overflows floats; the product form does not
    v = pass_at_k(256, 3, 128)
    exact = 1 - Fraction(1) * (128 * 127 * 126) / (256 * 255 * 254)
    assert v == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(256, 0, 256) == 0.0 and pass_at_k(256, 1, 256) == 1.0
    for k in pass_ks(256):
        assert 0.0 <= pass_at_k(256, 7, k) <= 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert pass_ks(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_majority_vote_classes_and_ties():
    eq = lambda a, b: a.replace(" ", "") == b.replace(" ", "")  # noqa: E731
    # "1 / 2" and "1/2" are one class (2 votes) vs "3" (2 votes): tie -> earliest first answer wins
    assert majority_vote(["3", None, "1/2", "3", "1 / 2"], eq) == (0, 2)
    assert majority_vote(["1/2", "3", "1 / 2", "3"], eq) == (0, 2)
    assert majority_vote([None, None], eq) == (None, 0)
    assert majority_vote([None, "5", "7", "7"], eq) == (2, 2)


def test_majority_vote_uses_equivalence_brute_force():
    rng = random.Random(0)
    values = ["\\frac12", "0.5", "2", "3", "\\frac{4}{2}"]
    canon = {"\\frac12": 0.5, "0.5": 0.5, "2": 2, "3": 3, "\\frac{4}{2}": 2}
    for _ in range(50):
        answers = [rng.choice(values + [None]) for _ in range(rng.randint(1, 12))]
        idx, count = majority_vote(answers, lambda a, b: canon[a] == canon[b])
        tallies = {}
        for k, a in enumerate(answers):
            if a is not None:
                first, n = tallies.get(canon[a], (k, 0))
                tallies[canon[a]] = (first, n + 1)
        if not tallies:
            assert idx is None
            continue
        best = max(tallies.values(), key=lambda t: (t[1], -t[0]))
        assert (idx, count) == best


def test_grade_problem_and_records_validate():
    comps = ["... The answer is: 0.5", "The answer is $\\frac{1}{2}$.", "The answer is 2", "no idea", "so \\boxed{2}",
             "The answer is: 2"]
    g = grade_problem(comps, "We get $\\boxed{\\frac12}$.", greedy_completion="The answer is 1/2")
    assert g["reference_answer"] == "\\frac12"
    assert g["verdicts"] == [True, True, False, False, False, False]
    assert g["extracted_answers"][3] is None
    # 0.5 and \frac{1}{2} are one class of 2; "2" has 3 votes and wins
    assert g["majority_answer"] == "2" and g["majority_count"] == 3 and g["majority_correct"] is False
    assert g["greedy_correct"] is True
    rec = problem_record("p1", "What is 1/2?", "\\frac12", comps, [5, 6, 7, 8, 9, 10], type="Algebra",
                         level="Level 1", greedy_completion="The answer is 1/2", greedy_token_count=4, seed=0)
    validate(rec, "samples")
    assert rec["seed"] == 0 and rec["num_correct"] == 2
    bad = dict(rec, verdicts=rec["verdicts"][:-1])
    with pytest.raises(ValueError, match="verdicts"):
        validate(bad, "samples")
    with pytest.raises(ValueError, match="token counts"):
        problem_record("p", "q", "1", ["a"], [1, 2])


def _record(verdicts, majority, greedy=None, **extra):
    rec = {"verdicts": verdicts, "num_correct": sum(verdicts), "majority_correct": majority,
           "extracted_answers": ["x"] * len(verdicts), "token_counts": [10] * len(verdicts), **extra}
    if greedy is not None:
        rec["greedy_correct"] = greedy
    return rec


def test_summarize_against_hand_computation():
    recs = [
        _record([True, False, False, False, False], True, True, type="A", level="Level 1"),
        _record([False] * 5, False, False, type="A", level="Level 2"),
        _record([True, True, True, False, True], True, False, type="B", level="Level 1"),
    ]
    s = summarize(recs, seconds=3.0)
    validate(s, "summary")
    assert s["n"] == 5 and s["problems"] == 3
    assert list(s["pass_at_k"]) == ["1", "2", "4", "5"]
    for k in (1, 2, 4, 5):
        expected = sum(float(_brute_pass_at_k(r["verdicts"], k)) for r in recs) / 3
        assert s["pass_at_k"][str(k)] == pytest.approx(expected)
    assert s["pass_ratio"] == pytest.approx((1 / 5 + 0 + 4 / 5) / 3)
    assert s["majority_accuracy"] == pytest.approx(2 / 3)
    assert s["greedy_accuracy"] == pytest.approx(1 / 3)
    assert s["generated_tokens"] == 150 and s["tokens_per_second"] == pytest.approx(50.0)
    assert s["breakdowns"]["type"]["A"]["problems"] == 2
    assert s["breakdowns"]["type"]["B"]["pass_ratio"] == pytest.approx(0.8)
    assert s["breakdowns"]["level"]["Level 1"]["majority_accuracy"] == 1.0


def test_summarize_without_greedy_and_timing():
    s = summarize([_record([True, False], False)])
    validate(s, "summary")
    assert s["greedy_accuracy"] is None and s["seconds"] is None and s["tokens_per_second"] is None
    assert s["breakdowns"] == {}
    broken = dict(s, pass_at_k={"1": 0.5})
    with pytest.raises(ValueError, match="pass_at_k"):
        validate(broken, "summary")
    with pytest.raises(ValueError, match="pass_ratio"):
        validate(dict(s, pass_ratio=1.5), "summary")
    with pytest.raises(ValueError):
        summarize([])


def test_guessing_baseline_against_enumeration():
    """Every sequence of k draws from the other problems' answers, enumerated: the fraction of sequences
    that contain the problem's own answer, averaged over problems."""
    import itertools

    from fastmath.metrics import guessing_baseline

    refs = ["1,000", "1000", "$5$", "5", "7", None, "  "]  # equal after normalisation: 1,000 = 1000 and $5$ = 5
    canon = ["1000", "1000", "5", "5", "7"]
    got = guessing_baseline(refs, [1, 2, 3])
    assert got["problems"] == 5
    for k in (1, 2, 3):
        rates = []
        for i, mine in enumerate(canon):
            others = canon[:i] + canon[i + 1:]
            seqs = list(itertools.product(others, repeat=k))
            rates.append(sum(mine in seq for seq in seqs) / len(seqs))
        assert got["pass_at_k"][str(k)] == pytest.approx(sum(rates) / len(rates))
    assert guessing_baseline(["3"], [1]) is None and guessing_baseline([None, None], [1]) is None


def test_summary_carries_the_guessing_baseline():
    from fastmath.sample_io import format_table

    recs = [dict(_record([True, False], False), reference_answer=a) for a in ("2", "2", "3")]
    s = summarize(recs)
    validate(s, "summary")
    # "2": one of the two others is "2" -> 1/2 per draw; "3": never
    assert s["guessing_baseline"]["pass_at_k"]["1"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert s["guessing_baseline"]["pass_at_k"]["2"] == pytest.approx((0.75 + 0.75 + 0) / 3)
    assert "Pass@2 by guessing (floor)" in format_table(s)

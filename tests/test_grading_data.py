"""Extraction and equivalence on every reference answer of the real GSM8K test set and the 1,000 MATH
problems in ../shared/data (skipped when that folder is absent). The references are checked against an
independent extraction (a plain brace matcher / the text after ####), then against rewritten forms of
themselves (must be equal) and near misses built so that they cannot be equal (must not be)."""
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from fastmath.grading import Grader, extract_answer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "math_test_1000.jsonl").exists(), reason="../shared/data absent")


def _records(name):
    with open(DATA / name) as f:
        return [json.loads(line) for line in f]


def _last_boxed_plain(text):
    """Independent reference extraction: content of the last \\boxed{...} by brace counting."""
    start = text.rindex("\\boxed")
    j = text.index("{", start)
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1: k]
    raise AssertionError("unbalanced")


@pytest.fixture(scope="module")
def grader():
    g = Grader(workers=2)
    yield g
    g.close()


@pytest.fixture(scope="module")
def math_refs():
    refs = []
    for r in _records("math_test_1000.jsonl"):
        got = extract_answer(r["solution"])
        assert got is not None and got.strip() == _last_boxed_plain(r["solution"]).strip(), r["solution"][-200:]
        refs.append(got)
    return refs


@pytest.fixture(scope="module")
def gsm_refs():
    refs = []
    for r in _records("gsm8k_test.jsonl"):
        got = extract_answer(r["answer"])
        expected = r["answer"].split("####")[-1].strip().replace(",", "")
        assert got == expected
        refs.append(got)
    return refs


_SIMPLE_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def _exact_value(ans):
    """The value of an integer / decimal / \\frac{a}{b} reference (independent of fastmath), else None."""
    plain = ans.replace(",\\!", "").replace("{,}", "")
    if re.fullmatch(r"-?\d+(\.\d+)?", plain) or re.fullmatch(r"-?\d{1,3}(,\d{3})+", plain):
        return Fraction(plain.replace(",", ""))
    m = _SIMPLE_FRAC.fullmatch(ans)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    return None


def _decimal(q):
    """A terminating Fraction as a decimal string; None if it does not terminate."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    digits = 0
    while (q * 10**digits).denominator != 1:
        digits += 1
    return f"{float(q):.{digits}f}" if digits else str(q.numerator)


def _rewrites(ans):
    """Forms of `ans` that must grade equal to it."""
    out = [f"${ans}$", f" {ans} ", ans.replace("\\frac", "\\dfrac"), ans.replace("\\dfrac", "\\frac")]
    out.append(re.sub(r"([+=]|\\cdot)", r" \1 ", ans))
    if "\\left" not in ans:
        out.append(ans.replace("(", "\\left(").replace(")", "\\right)"))
    out.append(extract_answer(f"So we are done.\nThe answer is: {ans}"))
    q = _exact_value(ans)
    if q is not None:
        out.append(f"\\frac{{{q.numerator}}}{{{q.denominator}}}" if q.denominator != 1 else f"{q.numerator}.0")
        if q.denominator != 1 and _decimal(q):
            out.append(_decimal(q))
        if q.denominator == 1 and abs(q) >= 1000:
            n = f"{abs(q.numerator):,}"
            sign = "-" if q < 0 else ""
            out += [sign + n, sign + n.replace(",", "{,}"), sign + n.replace(",", ",\\!")]
        if q.denominator == 1:
            out.append(str(q.numerator))
    elif not any(c in ans for c in (",", "=", "_", "\\text", "\\begin", "\\cup", "\\infty")):
        out.append(f"\\frac{{2\\left({ans}\\right)}}{{2}}")  # equal only through the symbolic path
    return out


def _near_misses(ans):
    """Forms of `ans` that cannot be equal to it."""
    q = _exact_value(ans)
    if q is not None:
        return [str(q + 1) if q.denominator == 1 else f"\\frac{{{q.numerator + q.denominator}}}{{{q.denominator}}}",
                str(q * 10 + 1) if q.denominator == 1 else f"\\frac{{{q.denominator}}}{{{q.numerator}}}"
                if abs(q) != 1 else "2"]
    if "\\text" in ans:
        return ["\\text{something else}"]
    if ans.startswith(("(", "[", "\\left(", "\\left[")) and "," in ans:
        closing = ans.rstrip()[-1]
        return [ans.rstrip()[:-1] + ",0" + closing]  # one element more
    if "," in ans or "=" in ans or "\\begin" in ans or "\\cup" in ans:
        return [ans + ",0"] if "=" not in ans and "\\cup" not in ans and "\\begin" not in ans else []
    return [f"{ans}+1", f"2\\left({ans}\\right)+1"]


def _check(grader, refs):
    pairs, labels = [], []
    for ref in refs:
        for r in _rewrites(ref):
            pairs.append((r, ref))
            labels.append(True)
        for r in _near_misses(ref):
            pairs.append((r, ref))
            labels.append(False)
    got = grader.equiv_many(pairs)
    wrong = [(p, lab) for p, lab, g in zip(pairs, labels, got) if g != lab]
    assert not wrong, f"{len(wrong)} of {len(pairs)} wrong, e.g. {wrong[:10]}"
    return len(pairs)


def test_math_references(grader, math_refs):
    assert len(math_refs) == 1000
    assert _check(grader, math_refs) > 8000


def test_gsm8k_references(grader, gsm_refs):
    assert len(gsm_refs) == 1319
    assert _check(grader, gsm_refs) > 10000

"""Hostile answers: is_equiv must return a bool within a time limit, execute nothing, and never let a
worker exhaust memory. A sentinel file that executed code would create must never appear."""
import time

import pytest

from fastmath._grading_worker import TooBig, to_sympy
from fastmath._latex import NotExact, ParseError, exact_value, parse_math
from fastmath.grading import Grader, extract_answer

LIMIT_S = 12.0  # per call: the slow-path timeout (2 s here) + worker restart + slack for a shared CI box


@pytest.fixture(scope="module")
def grader():
    g = Grader(workers=1, timeout=2.0)
    yield g
    g.close()


def _hostile(sentinel):
    s = str(sentinel)
    return [
        f"__import__('os').system('touch {s}')",
        f"open('{s}', 'w').write('x')",
        f"exec(\"open('{s}','w')\")",
        f"eval(\"__import__('os').system('touch {s}')\")",
        f"lambda: __import__('os').system('touch {s}')",
        f"import os; os.system('touch {s}')",
        f"\\text{{__import__('os').system('touch {s}')}}",
        f"$(touch {s})",
        f"`touch {s}`",
        "().__class__.__bases__[0].__subclasses__()",
        "10^{10^{10^{10}}}",
        "9**9**9**9",
        "9^{9^{9^{9}}}",
        "2^{2^{2^{2^{2^{2}}}}}",
        "(10^{10^{10}})!",
        "10^{10^{10}}!",
        "\\binom{10^{10^{10}}}{5}",
        "(x+1)^{10^{10}}",
        "e^{e^{e^{e^{e^{10}}}}}",
        "\\sqrt[10^{100}]{2}",
        "{" * 5000 + "1" + "}" * 5000,
        "(" * 3000 + "1" + ")" * 3000,
        "\\frac{" * 1500 + "1" + "}{2}" * 1500,
        "\\sqrt{" * 3000 + "2" + "}" * 3000,
        "1" * 1_000_000,
        "x+" * 500_000 + "1",
        "\\boxed{" * 100_000,
        "1/0", "0/0", "\\frac{1}{0}", "0^{-1}", "\\infty-\\infty", "\\log 0",
        "\x00\x01\x02", "\\" * 1000, "^^^^", "\\frac", "\\sqrt", "()", "[,]", "\\{\\}", "=",
        # the relation, named-value, approximation, word-list, \pm and array paths (issue #12)
        "x<" * 900 + "1", "<" * 1900, "\\ge" * 600, "1 \\ne 2 \\ne 3", "x \\in " * 300, "(a,b)=" * 300 + "(1,2)",
        "f(x)=" * 300 + "1", "\\approx" * 600, "1 \\approx " * 300, " and ".join(["1"] * 400), "\\pm" * 600,
        "\\pm 1," * 300, "\\left[\\begin{array}{c}" * 100 + "\\end{array}\\right]" * 100,
        "\\left[\\begin{array}{c}" + "1\\\\" * 500 + "\\end{array}\\right]", "12,\\!" * 500 + "345",
        "x \\ge 10^{10^{10^{10}}}", "9**9**9**9 \\approx 1", "\\pm 9^{9^{9^{9}}}", "-10^{10^{10}} < x \\le 9**9**9**9",
    ]


def test_hostile_inputs_return_bool_fast_and_execute_nothing(grader, tmp_path):
    sentinel = tmp_path / "pwned"
    inputs = _hostile(sentinel)
    refs = ["1", "9**9**9**9", "10^{10^{10^{10}}}", "x", "(1,2)"]
    for h in inputs:
        for pred, ref in [(h, r) for r in refs] + [(r, h) for r in refs] + [(h, h)]:
            t = time.perf_counter()
            v = grader.equiv(pred, ref)
            dt = time.perf_counter() - t
            assert isinstance(v, bool), (pred[:80], ref[:80])
            assert dt < LIMIT_S, f"{dt:.1f}s for {pred[:80]!r} vs {ref[:80]!r}"
    assert not sentinel.exists()


def test_huge_powers_are_refused_not_computed(grader):
    t = time.perf_counter()
    assert grader.equiv("10^{10^{10^{10}}}", "10^{10^{10^{10}}}+1") is False
    assert grader.equiv("9**9**9**9", "9^{9^{9^{9}}}") is False  # undecidable without computing it
    assert grader.equiv("9**9**9**9", "9**9**9**9") is True  # identical strings
    assert time.perf_counter() - t < LIMIT_S
    for s in ["10^{10^{10^{10}}}", "9**9**9**9", "(10^{10^{10}})!"]:
        with pytest.raises(NotExact):
            exact_value(parse_math(s))
        with pytest.raises(TooBig):
            to_sympy(parse_math(s))


def test_parser_refuses_code_and_depth():
    for s in ["__import__('os')", "os.system", "lambda: 1", "a.b", "x; y", "'1'", "\"1\""]:
        with pytest.raises(ParseError):
            parse_math(s)
    with pytest.raises(ParseError):
        parse_math("{" * 5000 + "1" + "}" * 5000)


def test_hostile_completions_extract_safely():
    for text, mode in [(t, m) for t in ["\\boxed{" * 100_000, "The answer is " * 50_000, "#### " * 50_000,
                                        "x" * 1_000_000, "Final answer is " * 50_000, "$" * 500_000]
                       for m in ("strict", "flexible")]:
        t = time.perf_counter()
        out = extract_answer(text, mode)
        assert out is None or isinstance(out, str)
        assert time.perf_counter() - t < 5.0


def test_worker_has_memory_cap_and_is_replaced_after_timeout(grader):
    # force a slow-path comparison so a worker exists, then check its address-space limit
    assert grader.equiv("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5+2\\sqrt{6}}") is True
    pids = grader.pool.pids()
    assert pids
    with open(f"/proc/{pids[0]}/limits") as f:
        line = next(l for l in f if l.startswith("Max address space"))
    assert line.split()[3] == str(grader.pool.memory_mb * 2**20)
    # a comparison sympy needs seconds for (expanding a 4-variable 30th power): with a 0.3 s timeout the
    # worker is killed, the verdict is False, and a fresh worker answers the next call
    g = Grader(workers=1, timeout=0.3)
    try:
        assert g.equiv("\\sqrt{8}", "2\\sqrt{2}") is True  # starts the worker
        old = g.pool.pids()
        t = time.perf_counter()
        hard = ("(x+y+z+1)^{30}", "(x+y+z+1)^{28}(x^2+y^2+z^2+2xy+2xz+2yz+2x+2y+2z+1)")
        assert g.equiv(*hard) is False
        assert time.perf_counter() - t < LIMIT_S
        assert g.pool.timeouts == 1
        assert g.pool.pids() and g.pool.pids() != old
        assert not _alive(old[0])
        assert g.equiv("\\sqrt{18}", "3\\sqrt{2}") is True  # the pool still works
    finally:
        g.close()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False

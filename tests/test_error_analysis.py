"""fastmath.synth.error_analysis: hand-built wrong solutions of every class, each checked against an exact
recomputation of the problem's chain (the reference is rebuilt from start/ops here, not read from the module)."""
import pytest

from fastmath.synth import error_analysis as E
from fastmath.synth import procedural as P

CFG = P.ProceduralConfig(min_steps=2, max_steps=3, max_operand=20, max_start=999, max_factor=3, max_value=999,
                         ops=("add", "sub", "mul", "div"), style="terse")
SYM = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
VERB = {"add": "buys", "sub": "gives", "mul": "times", "div": "shares"}


def apply(op, a, b):
    """Exact integer arithmetic of one step (division only when exact)."""
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    assert a % b == 0
    return a // b


def chain(start, ops):
    """[(a, op, b, c)] of the reference solution, recomputed."""
    out, v = [], start
    for op, x in ops:
        c = apply(op, v, x)
        out.append((v, op, x, c))
        v = c
    return out


def write(start, eqs, answer):
    """A terse solution text from equations (a, op, b, c) and a final answer."""
    lines = [f"has {start}"] + [f"{VERB[op]} {b}: {a} {SYM[op]} {b} = {c}" for a, op, b, c in eqs]
    return "\n".join(lines + [f"The answer is: {answer}"])


@pytest.fixture(scope="module")
def problems():
    recs = P.generate(40, CFG, split="test", seed=5)
    for r in recs:  # the generator's own solution is the recomputed chain, and classifies as correct
        eqs = chain(r["start"], r["ops"])
        assert eqs[-1][3] == int(r["answer"])
        assert E.equations(r["solution"]) == eqs
        assert E.classify(r["solution"], r["start"], r["ops"], r["answer"]) == ("correct", None)
    return recs


def test_calculation_errors(problems):
    for r in problems:
        eqs = chain(r["start"], r["ops"])
        for i in range(len(eqs)):  # one wrong result, carried on consistently: the answer is wrong
            bad = list(eqs)
            a, op, b, c = bad[i]
            bad[i] = (a, op, b, c + 1)
            v = c + 1
            for j in range(i + 1, len(bad)):
                _, opj, bj, _ = bad[j]
                if opj == "div" and v % bj:
                    opj = "mul"  # keep the later steps' arithmetic exact; only step i is wrong
                bad[j] = (v, opj, bj, apply(opj, v, bj))
                v = bad[j][3]
            if v == int(r["answer"]):
                continue
            assert not E.arithmetic_ok(*bad[i]) and all(E.arithmetic_ok(*e) for k, e in enumerate(bad) if k != i)
            assert E.classify(write(r["start"], bad, v), r["start"], r["ops"], r["answer"]) == ("calculation", None)
        # the last result copied wrong into the answer line
        last = eqs[-1][3]
        assert E.classify(write(r["start"], eqs, last + 3), r["start"], r["ops"], r["answer"]) == ("calculation", None)


def test_calculation_wins_over_reasoning(problems):
    r = problems[0]
    eqs = chain(r["start"], r["ops"])[:-1]  # a step missing (reasoning) ...
    a, op, b, c = eqs[-1]
    eqs[-1] = (a, op, b, c + 7)  # ... and a wrong result (calculation)
    assert E.classify(write(r["start"], eqs, c + 7), r["start"], r["ops"], r["answer"]) == ("calculation", None)


def test_reasoning_errors(problems):
    kinds = set()
    for r in problems:
        start, ops, ans = r["start"], r["ops"], int(r["answer"])
        # a step left out, with right arithmetic
        short = chain(start, ops[:-1])
        if short[-1][3] != ans:
            assert E.classify(write(start, short, short[-1][3]), start, ops, ans) == ("reasoning", "steps")
            kinds.add("steps")
        # a wrong operation on the right operands: add <-> sub, mul -> add
        swap = {"add": "sub", "sub": "add", "mul": "add", "div": "mul"}
        op0, x0 = ops[0]
        if op0 != "sub" or start >= x0:
            alt = [(swap[op0], x0)] + [tuple(o) for o in ops[1:]]
            eqs = chain(start, [alt[0]])
            v = eqs[0][3]
            for op, x in alt[1:]:
                if op == "div" and v % x:
                    break
                eqs.append((v, op, x, apply(op, v, x)))
                v = eqs[-1][3]
            else:
                if v != ans:
                    assert E.classify(write(start, eqs, v), start, ops, ans) == ("reasoning", "operation")
                    kinds.add("operation")
        # a wrong operand: the start value misread, everything computed right from it
        wrong_start = start + 10
        eqs, v = [], wrong_start
        for op, x in ops:
            if op == "div" and v % x:
                break
            eqs.append((v, op, x, apply(op, v, x)))
            v = eqs[-1][3]
        else:
            if v != ans:
                assert E.classify(write(start, eqs, v), start, ops, ans) == ("reasoning", "operand")
                kinds.add("operand")
    assert kinds == {"steps", "operation", "operand"}


def test_no_answer_and_format(problems):
    r = problems[0]
    sol = r["solution"]
    cut = sol.rsplit("\n", 1)[0]  # no answer line (a sample cut at the token limit)
    assert E.classify(cut, r["start"], r["ops"], r["answer"]) == ("no_answer", None)
    assert E.classify("", r["start"], r["ops"], r["answer"]) == ("no_answer", None)
    assert E.classify(cut + "\nThe answer is: many", r["start"], r["ops"], r["answer"]) == ("no_answer", None)
    # no equations at all but a wrong number: zero steps is a reasoning error (wrong number of steps)
    assert E.classify(f"has {r['start']}\nThe answer is: {r['start']}", r["start"], r["ops"],
                      r["answer"]) == ("reasoning", "steps")


def test_verbose_solutions_and_summary():
    cfg = P.ProceduralConfig(min_steps=1, max_steps=3, max_operand=9, max_start=200, max_value=999,
                             ops=("add", "sub", "mul"), style="verbose")
    recs = P.generate(10, cfg, split="test", seed=1)
    problems = {i: {"start": r["start"], "ops": r["ops"], "answer": r["answer"]} for i, r in enumerate(recs)}
    samples = []
    want = {"calculation": 0, "reasoning": 0, "no_answer": 0}
    for i, r in enumerate(recs):
        assert E.equations(r["solution"]) == chain(r["start"], r["ops"])
        eqs = chain(r["start"], r["ops"])
        a, op, b, c = eqs[-1]
        calc = r["solution"].replace(f"= {c} ", f"= {c + 1} ").replace(f"The answer is: {c}", f"The answer is: {c + 1}")
        texts = [r["solution"], calc, "I do not know", r["solution"]]
        verdicts = [True, False, False, True]
        want["calculation"] += 1
        want["no_answer"] += 1
        samples.append({"id": i, "completions": texts, "verdicts": verdicts,
                        "greedy_completion": calc, "greedy_correct": False})
    got = E.summarize(samples, problems)
    s = got["samples"]
    assert (s["total"], s["wrong"]) == (40, 20)
    assert {k: s[k] for k in want} == want and s["unclassified"] == 0
    assert got["greedy"]["total"] == 10 and got["greedy"]["calculation"] == 10


def test_equations_end_at_the_last_answer_line():
    # equations count up to the line of the last "The answer is"; one equation per line (no newline inside)
    text = "has 31\ngives 2: 31 - 3 + 1 = 46 answer is: 210\n12\n+ 3 = 15\nThe answer is: 46\n7 + 1 = 9"
    assert E.equations(text) == [(3, "add", 1, 46)]
    assert E.classify(text, 31, [("sub", 2)], 29) == ("calculation", None)
    # a negative intermediate written by a confused model is still checked exactly
    assert E.equations("has 3\ngives 5: 3 - 5 = -2\nbuys 4: -2 + 4 = 2\nThe answer is: 2") == \
        [(3, "sub", 5, -2), (-2, "add", 4, 2)]

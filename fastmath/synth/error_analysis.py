"""Exact error classes of wrong answers to procedural problems (the Xwin-Math paper's Figure 5, in miniature).

A procedural problem (fastmath.synth.procedural) is a start value and a chain of (operation, operand)
steps, and its solutions write every step as one equation `a op b = c` (terse: "buys 5: 347 + 5 = 352";
verbose: "... has 347 + 5 = 352 apples.") before "The answer is: N". So every wrong answer can be put in
exactly one class by recomputing what the sample wrote:

- "no_answer" (no answer / format error): no final answer can be read (`fastmath.grading.extract_answer`,
  strict, as `fastmath sample` grades), or it is not an integer.
- "calculation": some written equation has wrong arithmetic (`a op b != c`, exact integer arithmetic;
  a division counts as right only when it is exact), or the final answer is not the result of the last
  written equation (a slip in copying it). This class wins when the sample also has a reasoning error.
- "reasoning": all written arithmetic is right, but the chain is not the problem's: a wrong number of
  steps ("steps"), a wrong operation ("operation"), or a wrong operand ("operand": an equation's left
  side is not the previous result or the start value, or its right operand is not the question's).

`classify` takes one completion; `summarize` counts the classes over wrong samples.
"""
from __future__ import annotations

import re

from ..grading import extract_answer

CLASSES = ("calculation", "reasoning", "no_answer")
REASONING_KINDS = ("steps", "operation", "operand", "other")
_SYMBOL = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
# `a op b = c` with integers (a wrong chain may go negative: "3 - 5 = -2", then "-2 + 4 = 2").
_EQUATION = re.compile(r"(?<![\d.])(-?\d+)[ \t]*([-+*/])[ \t]*(\d+)[ \t]*=[ \t]*(-?\d+)(?![\d.]*\d)")
_ANSWER_LINE = re.compile(r"the (?:final )?answer is", re.IGNORECASE)


def equations(text: str) -> list[tuple[int, str, int, int]]:
    """The equations `a op b = c` (each on one line) on the lines before the line of the last "The answer is",
    as (a, op, b, c), op in add/sub/mul/div."""
    m = None
    for m in _ANSWER_LINE.finditer(text):
        pass
    body = text[:text.rfind("\n", 0, m.start()) + 1] if m else text
    return [(int(a), _SYMBOL[op], int(b), int(c)) for a, op, b, c in _EQUATION.findall(body)]


def arithmetic_ok(a: int, op: str, b: int, c: int) -> bool:
    """Whether `a op b = c` holds exactly (division: b != 0 and a == b * c)."""
    if op == "add":
        return a + b == c
    if op == "sub":
        return a - b == c
    if op == "mul":
        return a * b == c
    return b != 0 and a == b * c


def _as_int(answer: str | None) -> int | None:
    if answer is None:
        return None
    s = answer.strip().replace(",", "")
    return int(s) if re.fullmatch(r"-?\d+", s) else None


def classify(text: str, start: int, ops, answer) -> tuple[str, str | None]:
    """(class, detail) of one completion for the problem (start, ops = [(op, operand), ...], answer).

    class is "correct" (the final answer equals the reference, as integers) or one of CLASSES; detail is
    the kind of reasoning error (REASONING_KINDS) for "reasoning", else None.
    """
    final = _as_int(extract_answer(text))
    if final is None:
        return "no_answer", None
    if final == int(answer):
        return "correct", None
    eqs = equations(text)
    if any(not arithmetic_ok(*e) for e in eqs) or (eqs and eqs[-1][3] != final):
        return "calculation", None
    ops = [(str(o), int(x)) for o, x in ops]
    if len(eqs) != len(ops):
        return "reasoning", "steps"
    if any(e[1] != o for e, (o, _) in zip(eqs, ops)):
        return "reasoning", "operation"
    value = int(start)
    for (a, _, b, c), (_, x) in zip(eqs, ops):
        if a != value or b != x:
            return "reasoning", "operand"
        value = c
    return "reasoning", "other"  # not reachable for integer answers: a right chain ends at the answer


def summarize(samples, problems: dict) -> dict:
    """Error classes of every wrong sample and of every wrong greedy answer.

    samples: `fastmath sample` records (`id`, `completions`, `verdicts`, optionally `greedy_completion` and
        `greedy_correct`); problems: {id: {"start", "ops", "answer"}} (the held-out file's fields).
    A sample the grader marked wrong but that this module reads as right (it never happens with integer
    answers; kept so that nothing is lost) is counted under "unclassified".
    Returns {"samples": {"total", "wrong", class: count, ..., "reasoning_kinds": {...}, "unclassified"},
    "greedy": the same for the greedy answers}.
    """
    def empty():
        return {"total": 0, "wrong": 0, **{c: 0 for c in CLASSES},
                "reasoning_kinds": {k: 0 for k in REASONING_KINDS}, "unclassified": 0}

    out = {"samples": empty(), "greedy": empty()}

    def add(bucket, text, ok, prob):
        bucket["total"] += 1
        if ok:
            return
        bucket["wrong"] += 1
        cls, detail = classify(text, prob["start"], prob["ops"], prob["answer"])
        if cls == "correct":
            bucket["unclassified"] += 1
            return
        bucket[cls] += 1
        if detail:
            bucket["reasoning_kinds"][detail] += 1

    for rec in samples:
        prob = problems[rec["id"]]
        for text, ok in zip(rec["completions"], rec["verdicts"]):
            add(out["samples"], text, ok, prob)
        if rec.get("greedy_completion") is not None:
            add(out["greedy"], rec["greedy_completion"], bool(rec.get("greedy_correct")), prob)
    return out

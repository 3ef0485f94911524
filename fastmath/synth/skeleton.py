"""The arithmetic skeleton of a procedural question, read back from its text, and its exact answer.

`fastmath.synth.procedural` writes every question from a skeleton (a start value and a list of
(operation, operand) steps) with one sentence per step; the question text is the same in the verbose and
terse styles (only the solutions differ). `parse_question` inverts that rendering:

    >>> parse_question("Mia has 7 stickers. She buys 5 more stickers. Then she gives 3 stickers to a friend. "
    ...                "How many stickers does Mia have now?")
    (7, [('add', 5), ('sub', 3)])

It returns None for any text that is not a procedural question (another sentence form, a different item or
person in the last sentence than in the first, extra text). Questions a model writes in this form are
parsed the same way, whatever their numbers, so a synthetic question can be solved exactly (`solve`) and
decontaminated by skeleton (`skeleton_key`, the same key the generator's train/test split hashes).
Pure Python, no eval of any text.
"""
from __future__ import annotations

import re
from fractions import Fraction

from .procedural import skeleton_key

__all__ = ["parse_question", "solve", "exact_answer", "skeleton_key", "question_key"]

_NUM = r"(\d{1,9})"
_WORD = r"([A-Za-z]+)"
_FIRST = re.compile(rf"{_WORD} has {_NUM} {_WORD}\.")
_LAST = re.compile(rf"How many {_WORD} does {_WORD} have now\?")
# One sentence per step; group 1 is the operand, group 2 (where present) the item.
_STEPS = {
    "add": re.compile(rf"buys {_NUM} more {_WORD}\."),
    "sub": re.compile(rf"gives {_NUM} {_WORD} to a friend\."),
    "mul": re.compile(rf"gets more {_WORD} until (?:she|he) has {_NUM} times as many as before\."),
    "div": re.compile(rf"shares the {_WORD} equally among {_NUM} boxes and keeps one box\."),
}
_SUBJECT = re.compile(r"(?:She|He|Then she|Then he) ")
_SENTENCE = re.compile(r"[^.?]*[.?]")


def parse_question(text, strict: bool = True) -> tuple[int, list[tuple[str, int]]] | None:
    """(start, [(op, operand), ...]) of a procedural question, or None when `text` is not one.

    Whitespace between sentences is free; each sentence must have exactly the generator's form. strict=True
    also requires every step to name the same item as the first sentence and the question to ask about the
    same person and item. strict=False reads the arithmetic of a question a model wrote with the sentence
    forms right but the items or people mixed up ("Leo has 13 books. He gives 2 coins to a friend. ... How
    many cards does Leo have now?"): its skeleton is still the start value and the steps.
    """
    if not isinstance(text, str):
        return None
    norm = re.sub(r"\s+", " ", text.strip())
    pieces = _SENTENCE.findall(norm)
    if "".join(pieces) != norm:
        return None  # text outside the sentences (e.g. a trailing fragment)
    sentences = [s.strip() for s in pieces]
    if len(sentences) < 3:
        return None
    m = _FIRST.fullmatch(sentences[0])
    last = _LAST.fullmatch(sentences[-1])
    if m is None or last is None:
        return None
    name, start, item = m.group(1), int(m.group(2)), m.group(3)
    if strict and (last.group(1) != item or last.group(2) != name):
        return None
    ops = []
    for i, sentence in enumerate(sentences[1:-1]):
        subj = _SUBJECT.match(sentence)
        if subj is None or (i == 0) != (not subj.group(0).startswith("Then")):
            return None  # the first step starts "She/He", the others "Then she/he"
        body = sentence[subj.end():]
        for op, pattern in _STEPS.items():
            sm = pattern.fullmatch(body)
            if sm is not None:
                break
        else:
            return None
        if op in ("add", "sub"):
            x, step_item = int(sm.group(1)), sm.group(2)
        else:
            step_item, x = sm.group(1), int(sm.group(2))
        if strict and step_item != item:
            return None
        ops.append((op, x))
    return start, ops


def solve(start: int, ops) -> Fraction:
    """The exact value after applying every step, as a Fraction (ValueError on division by zero)."""
    value = Fraction(start)
    for op, x in ops:
        if op == "add":
            value += x
        elif op == "sub":
            value -= x
        elif op == "mul":
            value *= x
        elif op == "div":
            if x == 0:
                raise ValueError("division by zero in a skeleton")
            value /= x
        else:
            raise ValueError(f"unknown operation {op!r} in a skeleton")
    return value


def exact_answer(question: str, strict: bool = True) -> str | None:
    """The exact answer of a procedural question as a plain number ('12', '-3', '7/2' when not whole), or None
    when the text is not a procedural question (or divides by zero); `strict` as in parse_question."""
    sk = parse_question(question, strict)
    if sk is None:
        return None
    try:
        v = solve(*sk)
    except ValueError:
        return None
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def question_key(question: str, strict: bool = True) -> str | None:
    """`skeleton_key` of a question's parsed skeleton ('7 add 5 sub 3'), or None when it does not parse."""
    sk = parse_question(question, strict)
    return None if sk is None else skeleton_key(*sk)

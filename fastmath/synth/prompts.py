"""The two synthesis prompts of the paper (question, then answer), in GSM8K and MATH variants.

Question call: from ONE seed question, create a brand-new question, then verify it by solving it and
fix it in the same reply. The reply has three fields; the last one is kept:

    CREATED QUESTION: ...
    VERIFICATION AND MODIFICATION: ...
    FINAL CREATED QUESTION: ...

Answer call: solve the final question step by step; the reply ends with
`FINAL ANSWER: X` and then `The answer is: X` (the format fastmath trains on).
"""
import hashlib

STYLES = ("gsm8k", "math")

_QUESTION_HEAD = """You are an expert creator of {kind} problems. Below is one seed problem. Write ONE brand-new problem inspired by it.

Rules for the new problem:
1. It must obey common sense and be consistent with the real world (no negative counts of objects, no impossible quantities).
2. It must be solvable on its own: every quantity needed is given in the problem, and nothing refers to the seed problem.
3. It asks exactly one thing and has exactly one correct answer, {answer_rule}
4. It contains no solution, no hints and no answer.
5. It is new: do not copy the seed problem or only change its numbers; change the situation and the reasoning.

Then verify the new problem: solve it step by step, check every rule above, and if anything is wrong or ambiguous, modify the problem so that it satisfies all rules.

Reply with exactly these three fields, in this order, and nothing else:
CREATED QUESTION: <the new problem>
VERIFICATION AND MODIFICATION: <your step-by-step solution, the checks, and any modification you made>
FINAL CREATED QUESTION: <the final problem text only, after any modification>

Seed problem:
{seed}"""

_ANSWER_RULE = {
    "gsm8k": "which is a single number (an integer or a decimal; no units, no expressions).",
    "math": "which can be written as a short LaTeX expression (a number, fraction, radical, expression, interval, "
            "tuple or similar).",
}
_KIND = {"gsm8k": "grade-school math word", "math": "competition mathematics"}

_ANSWER_PROMPT = """Solve the following {kind} problem step by step. Show your reasoning clearly, one step per line.
{answer_rule}
End your reply with exactly these two lines:
FINAL ANSWER: X
The answer is: X
where X is the final answer{x_rule}.

Problem:
{question}"""

_ANSWER_FORMAT = {
    "gsm8k": "Give the final answer as a single number, without units.",
    "math": "Use LaTeX for mathematics. Simplify the final answer completely.",
}
_X_RULE = {
    "gsm8k": " as a plain number (no units, no dollar signs, no thousands separators)",
    "math": " in LaTeX without $ delimiters and without \\boxed",
}


def question_messages(seed_question, style):
    """Chat messages for the question-creation call.

    Args:
        seed_question: the text of one seed question.
        style: "gsm8k" (single numeric answer) or "math" (LaTeX answer).
    Returns:
        a list with one user message, in the OpenAI chat format.
    """
    _check_style(style)
    text = _QUESTION_HEAD.format(kind=_KIND[style], answer_rule=_ANSWER_RULE[style], seed=seed_question.strip())
    return [{"role": "user", "content": text}]


def answer_messages(question, style):
    """Chat messages for the answer call on a created question (same `style` as its question call)."""
    _check_style(style)
    text = _ANSWER_PROMPT.format(kind=_KIND[style], answer_rule=_ANSWER_FORMAT[style], x_rule=_X_RULE[style],
                                 question=question.strip())
    return [{"role": "user", "content": text}]


def prompt_version():
    """A short hash of every prompt template; part of a run's fingerprint so a resume never mixes prompts."""
    parts = [_QUESTION_HEAD, _ANSWER_PROMPT, *_ANSWER_RULE.values(), *_KIND.values(), *_ANSWER_FORMAT.values(),
             *_X_RULE.values()]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def _check_style(style):
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")

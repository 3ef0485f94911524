"""Parsing of model replies and of seed / evaluation files. Pure Python: no torch, no eval of any text.

- `parse_question_reply(text)` -> the FINAL CREATED QUESTION (robust to case, spacing and markdown).
- `parse_answer_reply(text, style)` -> (solution ending "The answer is: X", X).
- `normalise_answer(x)` -> a canonical string for exact-match answer voting.
- `load_problems(path)` -> records from a GSM8K, MATH or fastmath-format JSONL file, with their style.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path


class ParseError(ValueError):
    """A model reply that does not have the requested fields; `str(e)` is the reason kept in the rejects file."""


# ---------------------------------------------------------------------------------------------------------------
# Question replies

# A field header at the start of a line, allowing markdown decoration around it:
#   "FINAL CREATED QUESTION:", "**Final Created Question:**", "### Final created question", "- **CREATED QUESTION**: "
_MD = r"[ \t>#*_\-]*"  # leading quote / heading / bullet / bold markers
_FIELD_NAMES = {
    "final": r"final[ \t_]+created[ \t_]+question",
    "verification": r"verification[ \t_]+(?:and|&)[ \t_]+modifications?",
    "created": r"created[ \t_]+question",
}
_HEADER = re.compile(
    rf"(?im)^{_MD}(?P<name>{_FIELD_NAMES['final']}|{_FIELD_NAMES['verification']}|{_FIELD_NAMES['created']})"
    r"[ \t*_]*(?:[:：][ \t*_]*|$)"
)
_ANSWER_LEAK = re.compile(r"(?i)\bfinal answer\s*[:：]|\bthe answer is\s*[:：]")


def _field_name(match):
    name = match.group("name").lower()
    for key in ("final", "verification", "created"):
        if re.fullmatch(_FIELD_NAMES[key], name):
            return key
    raise AssertionError(name)  # the regex only matches the three names


def _clean_field(text):
    text = text.strip()
    text = re.sub(r"\n[ \t]*(?:-{3,}|\*{3,}|_{3,})[ \t]*$", "", text).strip()  # trailing markdown rule
    # a field wrapped whole in bold or quotes
    for left, right in (("**", "**"), ("__", "__"), ('"', '"'), ("“", "”")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left):-len(right)].strip()
    return text


def parse_question_fields(text):
    """Split a question reply into its fields.

    Returns:
        dict field -> text for "created", "verification" and "final"; when a field occurs more than once,
        the last occurrence wins (models sometimes restate the final question).
    """
    headers = list(_HEADER.finditer(text or ""))
    fields = {}
    for i, m in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        fields[_field_name(m)] = _clean_field(text[m.end():end])
    return fields


def parse_question_reply(text):
    """The FINAL CREATED QUESTION of a question reply.

    Raises:
        ParseError: the reply has no final field, it is empty, or it contains an answer.
    """
    if not text or not text.strip():
        raise ParseError("empty reply")
    fields = parse_question_fields(text)
    if "final" not in fields:
        raise ParseError("no 'FINAL CREATED QUESTION:' field")
    question = fields["final"]
    if not question:
        raise ParseError("empty 'FINAL CREATED QUESTION:' field")
    if _ANSWER_LEAK.search(question):
        raise ParseError("the final created question contains an answer")
    return question


# ---------------------------------------------------------------------------------------------------------------
# Answer replies

_FINAL_ANSWER = re.compile(r"(?im)^[ \t>#*_\-]*final[ \t_]+answer[ \t*_]*[:：][ \t*_]*(?P<x>.*?)[ \t*_]*$")
_ANSWER_IS = re.compile(r"(?im)^[ \t>#*_\-]*the[ \t]+answer[ \t]+is[ \t*_]*[:：]?[ \t*_]*(?P<x>.*?)[ \t*_]*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _strip_math(x):
    """Remove answer decoration: $...$, \\(...\\), \\boxed{...}, a trailing period, surrounding bold."""
    x = x.strip().strip("*").strip()
    changed = True
    while changed and x:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(x) >= len(left) + len(right) and x.startswith(left) and x.endswith(right):
                x, changed = x[len(left):-len(right)].strip(), True
        if x.endswith("."):  # "42." -> "42"
            x, changed = x[:-1].rstrip(), True
        m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", x, flags=re.S)
        if m and _balanced(m.group(1)):
            x, changed = m.group(1).strip(), True
    return x


def _balanced(s):
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def _gsm8k_number(x):
    """The single number in a GSM8K-style answer ("$1,200", "12 apples", "45%"), or None."""
    x = re.sub(r"\\text\{([^{}]*)\}", r"\1", x).replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    numbers = _NUMBER.findall(x)
    if len(numbers) != 1:
        return None
    rest = x.replace(numbers[0], " ", 1)
    if re.search(r"[\d=+*/^\\]", rest):  # an expression, not one number
        return None
    value = numbers[0].replace(",", "")
    return value


def parse_answer_reply(text, style):
    """Solution and final answer of an answer reply.

    Args:
        text: the reply; it should end with "FINAL ANSWER: X" and "The answer is: X".
        style: "gsm8k" (X must be one number) or "math" (X is LaTeX).
    Returns:
        (solution, answer): the step-by-step solution without the FINAL ANSWER line, ending with exactly one
        "The answer is: X" line; and X, without $ or \\boxed (for GSM8K: the plain number).
    Raises:
        ParseError: no final answer, two final answers that disagree, or a non-numeric GSM8K answer.
    """
    if not text or not text.strip():
        raise ParseError("empty reply")
    finals = list(_FINAL_ANSWER.finditer(text))
    stated = list(_ANSWER_IS.finditer(text))
    candidates = [m for m in (finals[-1:] + stated[-1:]) if _strip_math(m.group("x"))]
    if not candidates:
        raise ParseError("no 'FINAL ANSWER:' or 'The answer is:' line")
    answers = [_strip_math(m.group("x")) for m in candidates]
    if style == "gsm8k":
        numbers = [_gsm8k_number(a) for a in answers]
        if any(n is None for n in numbers):
            raise ParseError(f"GSM8K-style answer is not a single number: {answers[0][:80]!r}")
        answers = numbers
    if len({normalise_answer(a) for a in answers}) > 1:
        raise ParseError(f"'FINAL ANSWER' ({answers[0][:60]!r}) and 'The answer is' ({answers[1][:60]!r}) disagree")
    answer = answers[0]
    # solution = the reply up to the first answer line, then one canonical closing line
    cut = min(m.start() for m in finals + stated)
    body = text[:cut].rstrip()
    if not body:
        raise ParseError("no solution steps before the final answer")
    return f"{body}\nThe answer is: {answer}", answer


def normalise_answer(x):
    """A canonical string for exact-match voting between answers (no symbolic maths, nothing evaluated).

    Removes $, \\boxed, spacing commands, \\left/\\right, \\text{}, thousands separators and trailing periods;
    maps \\dfrac/\\tfrac to \\frac; writes numbers canonically ("12.50" -> "12.5", "3.0" -> "3").
    """
    x = _strip_math(str(x))
    x = re.sub(r"\\(?:left|right)\b", "", x)
    x = re.sub(r"\\[dt]frac", r"\\frac", x)
    x = re.sub(r"\\text(?:bf|rm)?\{([^{}]*)\}", r"\1", x)
    x = re.sub(r"\\[,!;: ]|~", "", x)
    x = re.sub(r"(?<=\d)(?:,|\{,\})(?=\d{3}\b)", "", x)
    x = re.sub(r"\s+", "", x).rstrip(".").lower()
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", x):
        whole, _, frac = x.partition(".")
        frac = frac.rstrip("0")
        sign = "-" if whole.startswith("-") else ""
        whole = whole.lstrip("-").lstrip("0") or "0"
        x = f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"
        if x == "-0":
            x = "0"
    return x


# ---------------------------------------------------------------------------------------------------------------
# Problem files


@dataclass(frozen=True)
class Problem:
    """One problem read from a JSONL file; `style` is "gsm8k" or "math" (from the record's format)."""
    id: str
    question: str
    style: str


def _looks_numeric(answer):
    return bool(re.fullmatch(r"\s*\$?\s*-?[\d,]*\.?\d+\s*%?\s*", str(answer)))


def record_problem(record, where):
    """(question, style) of one record in GSM8K, MATH or fastmath format.

    Raises:
        ValueError: naming `where` ("file:line") when the record is none of the three formats.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("problem"), str) and isinstance(record.get("solution"), str):
        return record["problem"], "math"  # MATH
    if isinstance(record.get("question"), str):
        answer = record.get("answer")
        if isinstance(record.get("solution"), str) and answer is not None:  # fastmath
            question = record["question"]
            mathy = "$" in question or "\\" in question or not _looks_numeric(answer)
            return question, "math" if mathy else "gsm8k"
        if isinstance(answer, str) and "####" in answer:  # GSM8K
            return record["question"], "gsm8k"
    raise ValueError(
        f"{where}: unknown problem record with keys {sorted(record)[:8]}; expected GSM8K "
        "(question, answer with '#### N'), MATH (problem, solution) or fastmath (question, solution, answer)"
    )


def load_problems(path):
    """Read every problem of a JSONL file (blank lines skipped).

    Returns:
        list of Problem; `id` is the record's "id"/"unique_id"/"idx" field if any, else "<file name>:<line>".
    Raises:
        ValueError: naming the file and line, for unreadable JSON, an unknown record, an empty question,
        or a file without problems.
    """
    path = Path(path)
    problems = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            question, style = record_problem(record, where)
            if not question.strip():
                raise ValueError(f"{where}: the question is empty")
            rid = next((record[k] for k in ("id", "unique_id", "idx") if isinstance(record.get(k), (str, int))), None)
            problems.append(Problem(str(rid) if rid is not None else f"{path.name}:{line_no}", question, style))
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems

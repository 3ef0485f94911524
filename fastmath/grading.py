"""Answer extraction and safe answer equivalence. Pure Python (+ sympy in worker processes); no torch.

Public contract (used by the sampler, `fastmath grade`, synth and the benchmarks):

    extract_answer(text, mode="strict") -> str | None   the final answer of a completion or a reference
                                         solution; mode "flexible" adds lm-eval/math-verify's last-number /
                                         last-math-span fallback
    last_boxed(text) -> str | None       the content of the last non-empty \\boxed{} (also fastmath.data's)
    is_equiv(pred, ref) -> bool          never raises, never hangs, never executes the text
    Grader(workers=2, timeout=3.0, cache=True)   the same with its own cache/worker pool; .equiv(pred, ref),
                                         .equiv_many([(pred, ref), ...]) (slow cases run in parallel), .stats
    normalize_answer(s) -> str           the string normal form used for fast equality and cache keys

How `is_equiv` decides (first that applies):
  1. non-strings or empty answers are never equal; inputs over MAX_CHARS (2,000) characters are only
     compared as normalised strings;
  2. normalised strings equal (LaTeX spacing, \\left/\\right, \\dfrac, \\text{}, units words, ^\\circ, \\%, $,
     thousands separators `1,000`, `1{,}000`, `10,\\!080`, `12,\\! 345`, `12{, }345` are all normalised away;
     `\\geq`, `\\ge`, `>=`, `≥` become one spelling, likewise `\\le` and `\\ne`/`!=`; "and"/"or" between items
     become commas);
  3. structure: multiple-choice letters; named values `x=5`, `f(t)=3t-2`, `(m,n)=(4,1)`, `k \\in (0,5]` vs
     the bare value (an equation such as `t^2-9=0` is not a named value); equations; relations side by side
     with `>` chains reversed (`2 < y` = `y > 2`), and a one-variable inequality as its interval (`y \\ge 2` =
     `[2, \\infty)`); a trailing `\\approx 0.143` dropped; `a \\pm b` as the list `a+b, a-b`; tuples and
     intervals (brackets must match, element by element); unordered lists `1,2` and sets `\\{1,2\\}`; unions
     of intervals; matrices (pmatrix, bmatrix, a bracketed array); numbers with a base subscript `25_6`;
  4. each scalar pair is parsed by a whitelisted recursive-descent parser (fastmath/_latex.py) into a tuple
     tree, never by eval/sympify/parse_expr. Two rational values compare exactly as Fractions (`8^6` =
     `262144`, `\\frac{1}{2004!}` != `\\frac{1}{2006!}`). A relative tolerance of 1e-4 applies only when a
     decimal literal is involved (`3.1416` = `\\pi`, `0.3333` = `\\frac13`), except that two values that
     are both terminating decimals compare exactly (`7.78` != `7.779`, `0.5` = `\\frac12`);
  5. otherwise both trees are evaluated in floating point at three fixed points for their free symbols:
     a clear difference is False at once; agreement goes to the slow path: sympy (`a - b` == 0, `expand`,
     `simplify`, then a 50-digit numeric check) in a worker process with a memory cap (RLIMIT_AS) that is
     killed and replaced when it exceeds `timeout`. A timeout, a refused (too large) expression or an
     undecidable case is False.
Verdicts are cached per (normalised pred, normalised ref). Bounded time: parsing and exact arithmetic are
bounded by MAX_CHARS, the parser's depth/token limits and the exact evaluator's size limits; the slow path
is bounded by `timeout` (3 s by default) plus, on the first slow call of a process, the workers' start-up
(about 1-2 s). `is_equiv` is symmetric except for multiple-choice answers (ref decides).
"""
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque

from ._latex import GREEK, NotExact, ParseError, ProbeError, exact_value, has_decimal, parse_math, probe, probe_points, symbols

MAX_CHARS = 2000  # longer answers are compared as normalised strings only
REL_TOL = 1e-4  # for decimal literals
PROBE_TOL = 1e-6  # floating-point disagreement that proves two exact forms differ
DEFAULT_TIMEOUT = 3.0
DEFAULT_MEMORY_MB = 1024

# ============================================================== extraction

_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
# fallbacks: "Final Answer: X", "Answer: X", and the phrases without "the" ("My final answer is: X",
# "Final answer is X", "so answer is X"); "the answer is" never gets here with an answer (rank 1 took it)
_FALLBACK = re.compile(r"(?:final\s+answer|answer)\s*(?::|(is)(?![a-zA-Z'])\s*:?)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])|\.$")
_UNITS_TAIL = re.compile(r"^(.*?[\d}\)\]])\s*((?:[a-zA-Z]{2,}\.?(?:\s+|$))+)$")
EXTRACT_MODES = ("strict", "flexible")


_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BRACE = re.compile(r"[{}]")


def last_boxed(text):
    """Content of the last non-empty \\boxed{...} / \\fbox{...} with balanced braces (or `\\boxed 5`), or None.

    The one reader of boxed answers (fastmath.data uses it for MATH solutions too). An empty or unclosed
    box is skipped for the one before it (`a \\boxed{3} b \\boxed{}` gives "3"); `\\boxedx{3}` is not a box.
    One pass over the braces, so unbalanced or deeply nested input stays linear.
    """
    if not isinstance(text, str):
        return None
    cmds = [m.end() for m in _BOX_CMD.finditer(text)]
    if not cmds:
        return None
    closing, stack = {}, []
    for m in _BRACE.finditer(text, cmds[0]):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    for k in reversed(cmds):
        while k < len(text) and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            end = closing.get(k)
            if end is not None and text[k + 1: end].strip():
                return text[k + 1: end]
        elif k < len(text):
            m = re.match(r"[^\s$]+", text[k: k + 200])
            if m:
                return m.group(0)
    return None


def _clean(ans):
    """Strip $, \\( \\), trailing periods and trailing unit words from an extracted answer."""
    ans = ans.strip()
    boxed = last_boxed(ans) if "\\boxed" in ans or "\\fbox" in ans else None
    if boxed is not None:
        ans = boxed.strip()
    for _ in range(3):
        ans = ans.strip().rstrip(".").strip()
        if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
            ans = ans.strip("$")
        elif ans.startswith("\\(") and ans.endswith("\\)") or ans.startswith("\\[") and ans.endswith("\\]"):
            ans = ans[2:-2]
    m = _UNITS_TAIL.match(ans) if len(ans) <= MAX_CHARS else None
    if m and not any(w in _MATH_WORDS for w in m.group(2).lower().split()):
        ans = m.group(1)
    return ans.strip() or None


_MATH_WORDS = {"pi", "sqrt", "and", "or", "infty", "sin", "cos", "tan", "log", "ln", "exp"}


def extract_answer(text, mode="strict"):
    """The final answer in a completion or reference solution, or None.

    Order of preference (the first rule that finds a non-empty answer wins):
      1. the last "The answer is: X" / "The answer is X" / "The final answer is X" (fastmath's training
         format, after the paper); X runs to the end of its line or sentence. If a \\boxed{} follows the
         phrase later in the text, that last \\boxed{} wins (MATH solutions say "the answer is" mid-way);
      2. GSM8K's "#### X";
      3. the last \\boxed{...} or \\fbox{...} (nested braces; see `last_boxed`);
      4. fallbacks: the last of "Final Answer: X", "Answer: X", and the phrases without "the" ("My final
         answer is: X", "Final answer is X"; X then runs to the end of its sentence);
      5. a text that is itself one short line of math (at most 100 characters with a digit or a LaTeX
         command and no plain word of 4+ letters, e.g. "42", "$\\frac{1}{2}$") is its own answer;
      6. mode="flexible" only: whichever of the last number and the last math span ($...$, $$...$$,
         \\(...\\), \\[...\\]) ends last in the text (what lm-evaluation-harness's GSM8K "flexible-extract"
         and math-verify fall back to); of a span that is a chain `a = b = c`, the last side.
    Then `$...$`, `\\(...\\)`, trailing periods and trailing unit words ("18 dollars") are stripped.
    mode="strict" (the default, and what `fastmath sample` uses) stops after rule 5.
    Never raises: anything that is not a string gives None.
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract_answer: mode must be one of {EXTRACT_MODES}, got {mode!r}")
    if not isinstance(text, str) or not text.strip():
        return None
    ans = _extract_strict(text)
    if ans is None and mode == "flexible":
        ans = _extract_flexible(text)
    return ans


def _extract_strict(text):
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is not None:
        rest = text[last.end():]
        boxed_after = "\\boxed" in rest or "\\fbox" in rest
        line = rest.split("\n", 1)[0]
        if boxed_after and not ("\\boxed" in line or "\\fbox" in line):
            ans = last_boxed(rest)
        else:
            m = _SENTENCE_END.search(line)
            ans = line[: m.start()] if m and "\\boxed" not in line else line
        ans = _clean(ans) if ans else None
        if ans:
            return ans
    pos = text.rfind("####")
    if pos >= 0:
        ans = _clean(text[pos + 4:].split("\n", 1)[0])
        if ans:
            return ans.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", ans) else ans
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    last = None
    for last in _FALLBACK.finditer(text):
        pass
    if last is not None:
        line = text[last.end():].split("\n", 1)[0]
        if last.group(1):  # "... answer is X. I hope it is correct." -> X
            m = _SENTENCE_END.search(line)
            line = line[: m.start()] if m else line
        ans = _clean(line)
        if ans:
            return ans
    stripped = text.strip()
    if ("\n" not in stripped and len(stripped) <= 100 and "\\boxed" not in stripped
            and re.search(r"[\d\\]", stripped) and not re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{4,}", stripped)):
        return _clean(stripped)
    return None


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_DOLLAR = re.compile(r"(?<!\\)\$\$?")


def _last_math_span(text):
    """(end, content) of the last complete $...$ / $$...$$ / \\(...\\) / \\[...\\] span, or None. Linear."""
    best = None
    opened = None  # (delimiter, end of the opening delimiter)
    for m in _DOLLAR.finditer(text):
        if opened is None:
            opened = (m.group(), m.end())
        elif m.group() == opened[0] or len(m.group()) > len(opened[0]):
            content = text[opened[1]: m.start()]
            if content.strip():
                best = (m.start() + len(opened[0]), content)
            opened = None
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        end = text.rfind(right)
        start = text.rfind(left, 0, end) if end > 0 else -1
        if start >= 0 and text[start + 2: end].strip() and (best is None or end + 2 > best[0]):
            best = (end + 2, text[start + 2: end])
    return best


def _extract_flexible(text):
    """Rule 6 of extract_answer: the later of the last number and the last math span."""
    number = None
    for number in _NUMBER.finditer(text):
        pass
    span = _last_math_span(text)
    if span is not None and (number is None or span[0] >= number.end()):
        content = span[1]
        sides = _split_top(content, "=") if len(content) <= MAX_CHARS else None
        if sides and len(sides) > 1 and sides[-1].strip():
            content = sides[-1]
        ans = _clean(content)
        if ans:
            return ans
    return number.group().replace(",", "") if number is not None else None


# ============================================================== normalisation

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])|~|\\(?:displaystyle|limits)(?![a-zA-Z])")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])\s*\.?")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACES = re.compile(r"\s+")
_KEEP_SPACE = re.compile(r"(?<![a-zA-Z]) | (?![a-zA-Z])")
# one spelling per relation (and for a few Unicode signs), so `y \geq 2`, `y >= 2`, `y ≥ 2` normalise alike;
# `5!=120` keeps its factorial (a `!=` right after a digit or bracket is not "not equal")
_SYMBOLS = re.compile(r"\\(?:geqslant|leqslant|geq|leq|neq|ge|le|ne|gt|lt)(?![a-zA-Z])|>=|<=|(?<![\d)}!])!="
                      r"|[≥≤⩾⩽≠±∓≈∞∈]")
_SYMBOL_FORM = {"\\geqslant": "\\ge ", "\\geq": "\\ge ", "\\ge": "\\ge ", ">=": "\\ge ", "≥": "\\ge ", "⩾": "\\ge ",
                "\\leqslant": "\\le ", "\\leq": "\\le ", "\\le": "\\le ", "<=": "\\le ", "≤": "\\le ", "⩽": "\\le ",
                "\\neq": "\\ne ", "\\ne": "\\ne ", "!=": "\\ne ", "≠": "\\ne ", "\\gt": ">", "\\lt": "<",
                "±": "\\pm ", "∓": "\\mp ", "≈": "\\approx ", "∞": "\\infty ", "∈": "\\in "}
_FRAC = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_BINOM = re.compile(r"\\[dt]binom(?![a-zA-Z])")


def _symbol_form(m):
    return _SYMBOL_FORM[m.group()]


_SEP_WORDS = re.compile(r",? (?:and|or) ")  # "3 and 9", "1, 2, and 3", "x=2 or x=-2" are lists


def normalize_answer(s):
    """A canonical string form of an answer: cheap, idempotent, used for fast equality and cache keys."""
    if not isinstance(s, str):
        return ""
    s = s.strip()
    if len(s) > MAX_CHARS:
        return _SPACES.sub("", s.replace("$", ""))  # only light work on over-long input
    s = s.replace("\\$", "").replace("$", "")
    if "\\!" in s:  # a negative thin space, also the spacing of `12,\\! 345`
        s = re.sub(r"\s*\\!\s*", "", s)
    if "{" in s:  # `1{,}000`, `12{, }345`
        s = re.sub(r"\{\s*,\s*\}", ",", s)
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    # the LaTeX rewrites only run when there is LaTeX (most answers are plain numbers)
    latex = "\\" in s
    if latex:
        s = _LEFT_RIGHT.sub("", s)
        s = _FRAC.sub(r"\\frac", s)
        s = _BINOM.sub(r"\\binom", s)
    if latex or "~" in s:
        s = _SPACING.sub(" ", s)
    if latex or "°" in s:
        s = _DEGREES.sub("", s)
    if latex or "<" in s or ">" in s or "!" in s or not s.isascii():
        s = _SYMBOLS.sub(_symbol_form, s)
    if "%" in s:
        s = s.replace("\\%", "").replace("%", "")
    for _ in range(4 if latex else 0):
        s2 = _TEXT_CMD.sub(r" \1 ", s)
        if s2 == s:
            break
        s = s2
    s = _SPACES.sub(" ", s).strip()
    s = s.rstrip(".").strip()
    m = _UNITS_TAIL.match(s)
    if m and not any(w in _MATH_WORDS for w in m.group(2).lower().split()):
        s = m.group(1).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    elif " " in s:
        s = _SEP_WORDS.sub(",", s)
    s = _KEEP_SPACE.sub("", s)
    return s


# ============================================================== structure

_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.DOTALL)
_BASED = re.compile(r"(\d+)_\{?(\d+)\}?")
_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")
_OPEN, _CLOSE = "([{", ")]}"


def _split_top(s, sep):
    """Split on `sep` outside any brackets; None when brackets do not balance."""
    parts, depth, start, k = [], 0, 0, 0
    while k < len(s):
        ch = s[k]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and s.startswith(sep, k):
            parts.append(s[start:k])
            k += len(sep)
            start = k
            continue
        k += 1
    if depth != 0:
        return None
    parts.append(s[start:])
    return parts


def _wrapped(s):
    """True when s[0] and s[-1] are brackets that enclose the whole string (types may differ: [a,b))."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return False
    depth = 0
    for k, ch in enumerate(s):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth == 0 and k != len(s) - 1:
                return False
    return depth == 0


_GREEK_NAME = "|".join(sorted(GREEK, key=len, reverse=True))
# a name is what the parser reads as one symbol (x, x_1, x_{12}, \alpha) or a word of 4+ letters (text to
# the parser, e.g. "\text{area}" -> "area"), with optional primes
_NAME = rf"(?:[a-zA-Z](?:_\{{?\w+\}}?)?|\\(?:{_GREEK_NAME})|[a-zA-Z]{{4,}})'*"
_ARG = rf"(?:{_NAME}|-?\d+(?:\.\d+)?)"
_NAMED_LHS = re.compile(
    rf"{_NAME}"  # x, \theta, area
    rf"|[a-zA-Z](?:_\{{?\w+\}}?)?(?:'+|\^\{{?-1\}}?)?\({_ARG}(?:,{_ARG})*\)"  # f(x), g'(t), f^{-1}(3), p(x,y)
    rf"|[(\[]{_NAME}(?:,{_NAME})+[)\]]"  # (m,n), [a,b]
)
_SIMPLE_NAME = re.compile(rf"[a-zA-Z](?:_\{{?\w+\}}?)?|\\(?:{_GREEK_NAME})")
_RELATION = re.compile(r"\\(?:le|ge|ne|in)(?![a-zA-Z])|<|>")
_IN = re.compile(r"\\in(?![a-zA-Z])")
_PM = re.compile(r"\\(?:pm|mp)(?![a-zA-Z])")
_FLIP = {">": "<", "\\ge": "\\le"}


def _split_relations(s):
    """Split `s` at relations outside brackets: ([sides], [ops]); None if there are none or brackets do not
    balance. Linear in len(s)."""
    sides, ops, depth, start, k = [], [], 0, 0, 0
    for m in _RELATION.finditer(s):
        for ch in s[k: m.start()]:
            depth += (ch in _OPEN) - (ch in _CLOSE)
        k = m.start()
        if depth == 0:
            sides.append(s[start: m.start()].strip())
            ops.append(m.group())
            start = m.end()
    for ch in s[k:]:
        depth += (ch in _OPEN) - (ch in _CLOSE)
    if not ops or depth != 0:
        return None
    sides.append(s[start:].strip())
    return sides, ops


def _structure(s, depth=0):
    r"""Classify a normalised answer: ("expr", s) | ("list", items) | ("set", items) | ("seq", open, close,
    items) | ("union", parts) | ("mat", rows) | ("eq", lhs, rhs) | ("in", lhs, rhs) | ("rel", sides, ops)
    | ("based", digits, base) | ("text", s).

    On the way: `[\begin{array}..\end{array}]` is a matrix; a trailing `\approx 0.143` is dropped (unless
    what precedes it is a name: `x \approx 2.5` is `x = 2.5`); `a \pm b` is the list `a+b, a-b`; a chain of
    `>`/`\ge` is written the other way round (`y > 2` is `2 < y`)."""
    if depth > 8:
        return ("text", s)
    if s[:1] in "([" and "\\begin{array}" in s and _wrapped(s) and _MATRIX.fullmatch(s[1:-1].strip()):
        s = s[1:-1].strip()  # \left[\begin{array}{cc} ... \end{array}\right]
    m = _MATRIX.fullmatch(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        return ("mat", tuple(tuple(_structure(c.strip(), depth + 1) for c in r.split("&")) for r in rows))
    if "\\approx" in s:
        parts = _split_top(s, "\\approx")
        if parts and len(parts) > 1 and parts[0].strip() and parts[-1].strip():
            head = parts[0].strip()
            if _NAMED_LHS.fullmatch(head):
                return ("eq", head, parts[-1].strip())
            return _structure(head, depth + 1)
    if "\\in" in s and _IN.search(s):
        parts = _split_top(s, "\\in")
        if parts and len(parts) == 2 and _NAMED_LHS.fullmatch(parts[0].strip()) and parts[1].strip():
            return ("in", parts[0].strip(), parts[1].strip())
    if "\\cup" in s:
        parts = _split_top(s, "\\cup")
        if parts and len(parts) > 1:
            return ("union", tuple(_structure(p.strip(), depth + 1) for p in parts))
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = _split_top(s[2:-2], ",")
        if inner is not None:
            return ("set", tuple(_structure(p.strip(), depth + 1) for p in inner if p.strip()))
    if _wrapped(s):
        inner = _split_top(s[1:-1], ",")
        if inner is not None and len(inner) > 1:
            return ("seq", s[0], s[-1], tuple(_structure(p.strip(), depth + 1) for p in inner))
    parts = _split_top(s, ",")
    if parts is not None and len(parts) > 1:
        items = []
        for p in parts:
            if p.strip():
                item = _structure(p.strip(), depth + 1)
                items.extend(item[1] if item[0] == "list" else (item,))  # `\pm 1, \pm 2` is one flat list
        return ("list", tuple(items))
    rel = _split_relations(s) if ("<" in s or ">" in s or "\\le" in s or "\\ge" in s or "\\ne" in s) else None
    if rel is not None and all(rel[0]) and "\\in" not in rel[1] and (len(rel[1]) == 1 or "\\ne" not in rel[1]):
        sides, ops = rel
        if all(op in _FLIP for op in ops):
            sides, ops = sides[::-1], [_FLIP[op] for op in reversed(ops)]
        return ("rel", tuple(sides), tuple(ops))
    parts = _split_top(s, "=")
    if parts is not None and len(parts) == 2 and parts[0].strip() and parts[1].strip():
        return ("eq", parts[0].strip(), parts[1].strip())
    m = _BASED.fullmatch(s)
    if m:
        return ("based", m.group(1), m.group(2))
    if "\\pm" in s or "\\mp" in s:
        signs = ({"\\pm": "+", "\\mp": "-"}, {"\\pm": "-", "\\mp": "+"})
        forms = [_PM.sub(lambda m: sign[m.group()], s) for sign in signs]
        if forms[0] != s:
            return ("list", tuple(_structure(f, depth + 1) for f in forms))
    return ("expr", s)


_INTERVAL_OPEN = {"<": "(", "\\le": "["}
_INTERVAL_CLOSE = {"<": ")", "\\le": "]"}


def _named(st):
    r"""(name, value structure) of a named value: `x = 5`, `f(t) = 3t-2`, `(m,n) = (4,1)`, `k \in (0,5]`, and a
    one-variable inequality, whose value is its interval (`2 \le y` -> [2, \infty), `y \ne 2` -> a union);
    None for anything else (`t^2-9 = 0` is an equation, not a named value)."""
    kind = st[0]
    if kind in ("eq", "in"):
        return (st[1], _structure(st[2])) if _NAMED_LHS.fullmatch(st[1]) else None
    if kind != "rel":
        return None
    sides, ops = st[1], st[2]
    names = [k for k, side in enumerate(sides) if _SIMPLE_NAME.fullmatch(side)]
    if not (len(sides) == 3 and names == [1] or len(sides) == 2 and len(names) == 1):
        return None  # `a < b` has no one variable; `1 < x < y` is not an interval
    var = sides[names[0]]
    bounds = [side for k, side in enumerate(sides) if k != names[0]]
    for b in bounds:
        try:
            tree = parse_math(b)
        except (ParseError, ValueError, ZeroDivisionError, RecursionError):
            return None
        if var.lstrip("\\") in symbols(tree):
            return None
    if ops == ("\\ne",):
        left, right = ("seq", "(", ")", (("expr", "-\\infty"), ("expr", bounds[0]))), \
                      ("seq", "(", ")", (("expr", bounds[0]), ("expr", "\\infty")))
        return var, ("union", (left, right))
    if any(op not in _INTERVAL_OPEN for op in ops):
        return None
    if len(sides) == 3:
        lo, hi, opening, closing = sides[0], sides[2], _INTERVAL_OPEN[ops[0]], _INTERVAL_CLOSE[ops[1]]
    elif names[0] == 0:  # x < b
        lo, hi, opening, closing = "-\\infty", sides[1], "(", _INTERVAL_CLOSE[ops[0]]
    else:  # a < x
        lo, hi, opening, closing = sides[0], "\\infty", _INTERVAL_OPEN[ops[0]], ")"
    return var, ("seq", opening, closing, (("expr", lo), ("expr", hi)))


# ============================================================== comparison (three-valued: True/False/None)

def _all3(results):
    """AND over three-valued results: False if any False, None if any undecided, else True."""
    undecided = False
    for r in results:
        if r is False:
            return False
        if r is None:
            undecided = True
    return None if undecided else True


def _match3(a_items, b_items, cmp):
    """Unordered (multiset) comparison: True if a perfect matching exists with True edges; False if none
    exists even counting undecided edges; None otherwise."""
    if len(a_items) != len(b_items):
        return False
    if len(a_items) > 40:
        return False
    edges = [[cmp(a, b) for b in b_items] for a in a_items]

    def perfect(ok):
        match = [-1] * len(b_items)

        def augment(i, seen):
            for j in range(len(b_items)):
                if ok(edges[i][j]) and not seen[j]:
                    seen[j] = True
                    if match[j] < 0 or augment(match[j], seen):
                        match[j] = i
                        return True
            return False

        return all(augment(i, [False] * len(b_items)) for i in range(len(a_items)))

    if perfect(lambda e: e is True):
        return True
    if not perfect(lambda e: e is not False):
        return False
    return None


_STATEMENTS = ("eq", "in", "rel")


class _Comparer:
    """Compares normalised answers. `symbolic(A, B, tol)` decides pairs of parsed trees that the fast
    checks cannot (None in the main process: the pair is then undecided and goes to a worker)."""

    def __init__(self, parse_cache=None, symbolic=None):
        self.parse_cache = parse_cache
        self.symbolic = symbolic

    def parse(self, s):
        cache = self.parse_cache
        if cache is not None and s in cache:
            return cache[s]
        try:
            tree = parse_math(s)
        except (ParseError, ValueError, ZeroDivisionError, RecursionError):
            tree = None
        if cache is not None:
            if len(cache) > 200_000:
                cache.clear()
            cache[s] = tree
        return tree

    def compare(self, pred, ref):
        """Three-valued comparison of two normalised answers (ref decides choice letters, `x=` forms)."""
        if pred == ref:
            return True
        if not pred or not ref or len(pred) > MAX_CHARS or len(ref) > MAX_CHARS:
            return False
        m = _CHOICE.fullmatch(ref)
        if m and ref.strip("()").isupper():
            p = _CHOICE.fullmatch(pred)
            return bool(p) and p.group(1).upper() == m.group(1)
        return self.compare_struct(_structure(pred), _structure(ref))

    def compare_struct(self, a, b):
        ka, kb = a[0], b[0]
        if ka in _STATEMENTS or kb in _STATEMENTS:
            return self.compare_statements(a, b)
        if ka in ("list", "set") and kb in ("list", "set"):
            return _match3(a[1], b[1], self.compare_struct)
        if ka != kb:
            if {ka, kb} == {"mat", "seq"}:
                mat, seq = (a, b) if ka == "mat" else (b, a)
                flat = [c for row in mat[1] for c in row]
                if seq[1] == "(" and seq[2] == ")" and (len(mat[1]) == 1 or all(len(r) == 1 for r in mat[1])):
                    items = (flat, list(seq[3])) if ka == "mat" else (list(seq[3]), flat)
                    return len(flat) == len(seq[3]) and _all3(self.compare_struct(x, y) for x, y in zip(*items))
            if {ka, kb} == {"based", "expr"}:
                based, expr = (a, b) if ka == "based" else (b, a)
                return based[1] == expr[1]
            return False
        if ka == "expr":
            return self.compare_scalar(a[1], b[1])
        if ka == "text":
            return a[1].lower() == b[1].lower()
        if ka == "based":
            return a[1:] == b[1:]
        if ka == "seq":
            if a[1:3] != b[1:3] or len(a[3]) != len(b[3]):
                return False
            return _all3(self.compare_struct(x, y) for x, y in zip(a[3], b[3]))
        if ka == "union":
            return _match3(a[1], b[1], self.compare_struct)
        if ka == "mat":
            if [len(r) for r in a[1]] != [len(r) for r in b[1]]:
                return False
            return _all3(self.compare_struct(x, y) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
        if ka == "eq":
            return self.compare_equation(a, b)
        return False

    def compare_statements(self, a, b):
        """At least one of a, b is an equation, a relation or `x \\in S`. Two equations compare as equations,
        two relations side by side; a named value (`x = 5`, `f(t) = ...`, `(m, n) = (4, 1)`, `k \\in (0, 5]`,
        `y \\ge 2` as [2, oo)) compares its value with a plain answer, or with another named value of the
        same name."""
        ka, kb = a[0], b[0]
        if ka == kb == "eq":
            return self.compare_equation(a, b)
        if ka == kb == "rel" and a[2] == b[2]:
            orders = (b[1], b[1][::-1]) if a[2] == ("\\ne",) else (b[1],)  # x \ne 2 is 2 \ne x
            results = [_all3(self.compare_scalar(x, y) for x, y in zip(a[1], sides)) for sides in orders]
            if True in results:
                return True
            if None in results:
                return None
        na = _named(a) if ka in _STATEMENTS else None
        nb = _named(b) if kb in _STATEMENTS else None
        if na is not None and nb is not None:
            return na[0] == nb[0] and self.compare_struct(na[1], nb[1])
        if na is not None and kb not in _STATEMENTS:
            return self.compare_struct(na[1], b)
        if nb is not None and ka not in _STATEMENTS:
            return self.compare_struct(a, nb[1])
        return False

    def compare_equation(self, a, b):
        same = _all3([self.compare_scalar(a[1], b[1]), self.compare_scalar(a[2], b[2])])
        if same is True:
            return True
        trees = [self.parse(x) for x in (a[1], a[2], b[1], b[2])]
        if any(t is None for t in trees):
            return same
        # the same equation up to a non-zero factor: (l1 - r1) / (l2 - r2) is a constant
        d1 = ("add", (trees[0], ("neg", trees[1])))
        d2 = ("add", (trees[2], ("neg", trees[3])))
        ratios = []
        try:
            for env in probe_points(symbols(d1) | symbols(d2)):
                ratios.append(probe(d1, env) / probe(d2, env))
        except (ProbeError, ZeroDivisionError):
            return self.symbolic(d1, d2, "ratio") if self.symbolic is not None else None
        if ratios[0] == 0 or any(abs(r - ratios[0]) > PROBE_TOL * abs(ratios[0]) for r in ratios):
            return False
        if self.symbolic is None:
            return None
        return self.symbolic(d1, d2, "ratio")

    def compare_scalar(self, a, b):
        if a == b:
            return True
        ta, tb = self.parse(a), self.parse(b)
        if ta is None or tb is None:
            # not math: text answers compare case- and space-insensitively
            return a.replace(" ", "").lower() == b.replace(" ", "").lower()
        decimal = has_decimal(ta) or has_decimal(tb)
        try:
            qa, qb = exact_value(ta), exact_value(tb)
        except (NotExact, ZeroDivisionError, OverflowError, ValueError):
            pass
        else:
            if qa == qb:
                return True
            if decimal and not (_terminates(qa) and _terminates(qb)):
                return abs(qa - qb) <= REL_TOL * max(abs(qa), abs(qb))
            return False
        try:
            pairs = [(probe(ta, env), probe(tb, env)) for env in probe_points(symbols(ta) | symbols(tb))]
        except ProbeError:
            pairs = None
        if pairs is not None:
            tol = REL_TOL if decimal else PROBE_TOL
            close = all(abs(x - y) <= tol * max(abs(x), abs(y)) + 1e-12 for x, y in pairs)
            if not close or decimal:
                return close
        if self.symbolic is None:
            return None
        return self.symbolic(ta, tb, "decimal" if decimal else "exact")


def _terminates(q):
    """True when the Fraction has a finite decimal expansion (denominator 2^a 5^b)."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


# ============================================================== worker pool

class _Worker:
    """One sympy worker process (fastmath/_grading_worker.py) speaking JSON lines over pipes."""

    def __init__(self, memory_mb):
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastmath._grading_worker", str(memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True, env=env,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False

    def send(self, obj):
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def read_lines(self):
        """Read what is available (after select said so); returns complete lines; [] and EOF -> None."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


class WorkerPool:
    """`size` sympy worker processes; each task gets `timeout` seconds, after which its worker is killed and
    replaced. Workers cap their address space at `memory_mb` (RLIMIT_AS). No signals, no threads."""

    STARTUP_TIMEOUT = 60.0

    def __init__(self, size=2, timeout=DEFAULT_TIMEOUT, memory_mb=DEFAULT_MEMORY_MB):
        self.size = max(1, int(size))
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.workers = []
        self.timeouts = 0
        self.tasks = 0
        self.lock = threading.Lock()

    def _start(self, n):
        while len(self.workers) < n:
            self.workers.append(_Worker(self.memory_mb))
        deadline = time.monotonic() + self.STARTUP_TIMEOUT
        waiting = {w.fd: w for w in self.workers if not w.ready}
        while waiting:
            left = deadline - time.monotonic()
            readable = select.select(list(waiting), [], [], max(0.0, left))[0] if left > 0 else []
            if not readable:
                for w in waiting.values():  # a worker that cannot start is dropped; its tasks get None
                    w.kill()
                    self.workers.remove(w)
                return
            for fd in readable:
                w = waiting.pop(fd)
                lines = w.read_lines()
                if lines is None:
                    w.kill()
                    self.workers.remove(w)
                elif b'"ready"' not in b"".join(lines):
                    waiting[fd] = w
                else:
                    w.ready = True

    def run(self, tasks):
        """Run [(pred_norm, ref_norm), ...] through the workers; returns [True | False | None, ...]."""
        with self.lock:
            return self._run(tasks)

    def _run(self, tasks):
        results = [None] * len(tasks)
        if not tasks:
            return results
        self._start(min(self.size, len(tasks)))
        pending = deque(range(len(tasks)))
        busy = {}  # fd -> (worker, task index, deadline)
        idle = [w for w in self.workers]
        while pending or busy:
            while pending and idle:
                w = idle.pop()
                i = pending.popleft()
                try:
                    w.send({"id": i, "pred": tasks[i][0], "ref": tasks[i][1]})
                except OSError:
                    self._replace(w)
                    continue
                busy[w.fd] = (w, i, time.monotonic() + self.timeout)
                self.tasks += 1
            if not busy:
                if pending and not self.workers:  # no worker could start: leave the rest undecided
                    break
                idle = [w for w in self.workers if w.fd not in busy]
                continue
            wait = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
            readable = select.select(list(busy), [], [], wait)[0]
            for fd in readable:
                w, i, _ = busy[fd]
                lines = w.read_lines()
                if lines is None:  # the worker died (e.g. hit its memory cap)
                    del busy[fd]
                    idle.extend(self._replace(w))
                    continue
                for line in lines:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if msg.get("id") == i:
                        results[i] = msg.get("verdict")
                        del busy[fd]
                        idle.append(w)
            now = time.monotonic()
            for fd, (w, i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[fd]
                    self.timeouts += 1
                    idle.extend(self._replace(w))
        return results

    def _replace(self, w):
        """Kill `w` and start a replacement; returns the new worker in a list ([] if it failed to start)."""
        w.kill()
        if w in self.workers:
            self.workers.remove(w)
        before = set(self.workers)
        self._start(len(self.workers) + 1)
        return [x for x in self.workers if x not in before]

    def pids(self):
        return [w.proc.pid for w in self.workers]

    def close(self):
        for w in self.workers:
            w.kill()
        self.workers = []


# ============================================================== the grader

class Grader:
    """Answer equivalence with a verdict cache and a sympy worker pool.

    Args:
        workers: worker processes for the symbolic slow path (started on first need).
        timeout: seconds per slow-path comparison before its worker is killed (the verdict is then False).
        cache: memoise verdicts per (normalised pred, normalised ref) and parses per string.
        memory_mb: address-space cap of each worker (RLIMIT_AS).
    """

    def __init__(self, workers=2, timeout=DEFAULT_TIMEOUT, cache=True, memory_mb=DEFAULT_MEMORY_MB):
        self.cache = cache
        self.verdicts = {}
        self.comparer = _Comparer(parse_cache={} if cache else None)
        self.pool = WorkerPool(workers, timeout, memory_mb)
        self.stats = {"calls": 0, "cache_hits": 0, "slow": 0}
        _live_graders.append(self)

    def equiv(self, pred, ref):
        """True when answer `pred` is equivalent to reference answer `ref`. Never raises."""
        return self.equiv_many([(pred, ref)])[0]

    def equiv_many(self, pairs):
        """Verdicts for [(pred, ref), ...]; undecided pairs run on the worker pool in parallel."""
        out = [False] * len(pairs)
        slow = {}  # (pred_norm, ref_norm) -> [indices]
        for k, (pred, ref) in enumerate(pairs):
            self.stats["calls"] += 1
            try:
                if not isinstance(pred, str) or not isinstance(ref, str):
                    continue
                key = (normalize_answer(pred), normalize_answer(ref))
                if self.cache and key in self.verdicts:
                    self.stats["cache_hits"] += 1
                    out[k] = self.verdicts[key]
                    continue
                if key in slow:
                    slow[key].append(k)
                    continue
                verdict = self.comparer.compare(*key)
            except (RecursionError, MemoryError, ValueError, ArithmeticError, TypeError, IndexError, KeyError):
                verdict = False
            if verdict is None:
                slow[key] = [k]
                continue
            out[k] = bool(verdict)
            self._remember(key, out[k])
        if slow:
            keys = list(slow)
            self.stats["slow"] += len(keys)
            try:
                results = self.pool.run(keys)
            except Exception:  # a broken pool must not break grading: undecided -> False
                results = [None] * len(keys)
            for key, verdict in zip(keys, results):
                verdict = verdict is True
                self._remember(key, verdict)
                for k in slow[key]:
                    out[k] = verdict
        return out

    def _remember(self, key, verdict):
        if self.cache:
            if len(self.verdicts) > 1_000_000:
                self.verdicts.clear()
            self.verdicts[key] = verdict

    def cache_hit_rate(self):
        return self.stats["cache_hits"] / max(1, self.stats["calls"])

    def close(self):
        """Stop the worker processes (they are also stopped at interpreter exit)."""
        self.pool.close()


_live_graders = []
_default = None
_default_lock = threading.Lock()


@atexit.register
def _close_all():
    for g in _live_graders:
        g.close()


def default_grader():
    """The process-wide Grader behind `is_equiv` (workers: $FASTMATH_GRADING_WORKERS, default 2)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader(workers=int(os.environ.get("FASTMATH_GRADING_WORKERS", "2")))
        return _default


def is_equiv(pred, ref):
    """True when the answer `pred` is mathematically equivalent to the reference answer `ref`.

    Never raises, never executes the text, returns within the bound described in the module docstring.
    Non-string or empty inputs give False.
    """
    try:
        return default_grader().equiv(pred, ref)
    except Exception:
        return False

"""A small, safe parser for the math in answers: LaTeX and plain notation -> a tuple AST.

Nothing here evaluates text as code. The tokenizer accepts a fixed alphabet, the recursive-descent
parser a whitelisted grammar, and the result is a tree of plain tuples (picklable, JSON-able):

    ("num", Fraction, is_decimal)   ("sym", name)   ("const", "pi" | "e" | "i" | "oo")
    ("add", (a, b, ...))  ("mul", (a, b, ...))  ("neg", a)  ("div", a, b)  ("pow", a, b)
    ("fact", a)  ("root", a, n)  ("fn", name, a)  ("abs", a)  ("binom", a, b)  ("log", a, base|None)

Grammar (highest binding last):
    expr    := ["+"|"-"] term (("+"|"-") term)*
    term    := unary (("*"|"/"|\\cdot|\\times|\\div) unary | <implicit> power)*
    unary   := ("-"|"+") unary | power
    power   := postfix ["^" unary]                      right-associative; "**" is "^"
    postfix := atom "!"*
    atom    := number | letter[_sub] | \\pi | e | i | \\infty | ( expr ) | { expr } | [ expr ] | |expr|
             | \\frac A B | \\sqrt[n] A | \\binom A B | \\sin A ... | \\log_b A | sqrt(..) | <mixed number 1\\frac{2}{3}>

Two evaluators work on the tree without sympy: `exact_value` (Fraction arithmetic with bounds on
the size of every intermediate result, so `10^{10^{10^{10}}}` or `9**9**9**9` are refused, never
computed) and `probe` (complex floating point at fixed pseudo-random points). sympy conversion lives in
the worker process (fastmath/_grading_worker.py).
"""
import cmath
import math
import re
from fractions import Fraction

MAX_DEPTH = 60  # nesting of groups; deeper input is refused (thousands of braces cannot recurse)
MAX_TOKENS = 1500
MAX_BITS = 100_000  # largest numerator/denominator the exact evaluator will build
MAX_FACTORIAL = 3000


class ParseError(ValueError):
    """The text is not in the whitelisted grammar (or is too deep/long)."""


class NotExact(ValueError):
    """The expression is not a rational number, or is too large to compute exactly."""


FUNCTIONS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh",
             "tanh", "exp", "ln", "log"}
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
         "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
         "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
PLAIN_NAMES = {"sqrt", "pi", "inf", "infty", "infinity", "oo"} | FUNCTIONS
MUL_CMDS = {"cdot", "times", "ast"}
SKIP_CMDS = {"left", "right", "displaystyle", "bigl", "bigr", "Bigl", "Bigr", "big", "Big", "mathrm",
             "mathit", "mathbf"}

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>\d+\.?\d*|\.\d+)|(?P<cmd>\\[a-zA-Z]+|\\[{}|])|(?P<word>[a-zA-Z]+)|(?P<pow>\*\*)"
    r"|(?P<op>[-+*/^_!()\[\]{},=|:]))"
)


def tokenize(s):
    """Split `s` into (kind, value) tokens; kinds: num, cmd, word, op. Raises ParseError."""
    tokens = []
    pos, n = 0, len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if m is None:
            if s[pos:].strip() == "":
                break
            raise ParseError(f"unexpected character {s[pos]!r}")
        pos = m.end()
        kind = m.lastgroup
        val = m.group(kind)
        if kind == "cmd":
            name = val[1:]
            if name in SKIP_CMDS:
                continue
            if name in ("{", "}"):
                tokens.append(("op", name))
                continue
            if name == "|":
                tokens.append(("op", "|"))
                continue
            if name in ("lvert", "rvert", "vert"):
                tokens.append(("op", "|"))
                continue
            tokens.append(("cmd", name))
        elif kind == "pow":
            tokens.append(("op", "^"))
        elif kind == "word":
            if val in PLAIN_NAMES:
                tokens.append(("word", val))
            elif len(val) <= 3:  # "xy" is x*y; longer words are text, not math
                tokens.extend(("word", ch) for ch in val)
            else:
                raise ParseError(f"word {val!r} is not math")
        else:
            tokens.append((kind, val))
        if len(tokens) > MAX_TOKENS:
            raise ParseError("too many tokens")
    return tokens


def _num(text):
    return ("num", Fraction(text.rstrip(".") or "0"), "." in text)


class _Parser:
    def __init__(self, tokens):
        self.toks = tokens
        self.i = 0
        self.depth = 0
        self.abs_depth = 0

    # ---- token helpers
    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else (None, None)

    def next(self):
        tok = self.peek()
        if tok[0] is None:
            raise ParseError("unexpected end")
        self.i += 1
        return tok

    def accept(self, kind, val):
        if self.peek() == (kind, val):
            self.i += 1
            return True
        return False

    def expect(self, kind, val):
        if not self.accept(kind, val):
            raise ParseError(f"expected {val!r}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")

    # ---- grammar
    def parse(self):
        node = self.expr()
        if self.peek()[0] is not None:
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return node

    def expr(self):
        self.enter()
        terms = [self.unary_term()]
        while True:
            if self.accept("op", "+"):
                terms.append(self.term())
            elif self.accept("op", "-"):
                terms.append(("neg", self.term()))
            else:
                break
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", tuple(terms))

    def unary_term(self):
        if self.accept("op", "-"):
            return ("neg", self.term())
        self.accept("op", "+")
        return self.term()

    def term(self):
        factors = [self.unary()]
        while True:
            kind, val = self.peek()
            if (kind == "op" and val == "*") or (kind == "cmd" and val in MUL_CMDS):
                self.i += 1
                factors.append(self.unary())
            elif (kind == "op" and val == "/") or (kind == "cmd" and val == "div"):
                self.i += 1
                den = self.unary()
                num = factors[0] if len(factors) == 1 else ("mul", tuple(factors))
                factors = [("div", num, den)]
            elif self.starts_atom():
                factors.append(self.power())
            else:
                break
        return factors[0] if len(factors) == 1 else ("mul", tuple(factors))

    def starts_atom(self):
        kind, val = self.peek()
        if kind in ("num", "word"):
            return True
        if kind == "cmd":
            return val not in MUL_CMDS and val != "div"
        if kind == "op":
            return val in ("(", "{", "[") or (val == "|" and self.abs_depth == 0)
        return False

    def unary(self):
        if self.accept("op", "-"):
            return ("neg", self.unary())
        if self.accept("op", "+"):
            return self.unary()
        return self.power()

    def power(self):
        self.enter()
        base = self.postfix()
        if self.accept("op", "^"):
            exp = self.unary()
            base = ("pow", base, exp)
            while self.accept("op", "!"):
                base = ("fact", base)
        self.depth -= 1
        return base

    def postfix(self):
        node = self.atom()
        while self.accept("op", "!"):
            node = ("fact", node)
        return node

    def group(self, close):
        self.enter()
        node = self.expr()
        self.expect("op", close)
        self.depth -= 1
        return node

    def latex_arg(self):
        """One argument of \\frac/\\sqrt: {group}, or a single digit/letter/command (\\frac 54)."""
        kind, val = self.peek()
        if kind == "op" and val == "{":
            self.i += 1
            return self.group("}")
        if kind == "num":
            self.i += 1
            if len(val) > 1:  # \frac54: the first digit only; push the rest back
                self.toks = self.toks[: self.i] + [("num", val[1:])] + self.toks[self.i:]
                val = val[0]
            return _num(val)
        if kind == "word" and len(val) == 1:
            self.i += 1
            return self.letter(val)
        if kind == "cmd":
            return self.atom()
        raise ParseError("bad argument")

    def letter(self, ch):
        if ch == "e":
            return ("const", "e")
        if ch == "i":
            return ("const", "i")
        name = ch
        if self.accept("op", "_"):
            kind, val = self.next()
            if kind == "op" and val == "{":
                parts = []
                while not self.accept("op", "}"):
                    k2, v2 = self.next()
                    if k2 not in ("num", "word"):
                        raise ParseError("bad subscript")
                    parts.append(v2)
                val = "".join(parts)
            elif kind not in ("num", "word"):
                raise ParseError("bad subscript")
            name = f"{ch}_{val}"
        return ("sym", name)

    def func_arg(self):
        """A function's argument: a bracketed group, or an implicit product of numbers and letters
        (\\sin 2x is sin(2x); \\sin x \\cos x is sin(x) cos(x))."""
        kind, val = self.peek()
        if kind == "op" and val in ("(", "{", "["):
            self.i += 1
            return self.group({"(": ")", "{": "}", "[": "]"}[val])
        factors = [self.power()]
        while self.peek()[0] == "num" or (self.peek()[0] == "word" and len(self.peek()[1]) == 1):
            factors.append(self.power())
        return factors[0] if len(factors) == 1 else ("mul", tuple(factors))

    def atom(self):
        self.enter()
        kind, val = self.next()
        node = None
        if kind == "num":
            node = _num(val)
            # mixed number: 1\frac{12}{13}, 5\frac12 (integer literal, then \frac of integer literals)
            if "." not in val and self.peek() == ("cmd", "frac"):
                node = self._maybe_mixed(node)
        elif kind == "word":
            if val == "pi":
                node = ("const", "pi")
            elif val in ("inf", "infty", "infinity", "oo"):
                node = ("const", "oo")
            elif val == "sqrt":
                node = ("root", self.func_arg(), ("num", Fraction(2), False))
            elif val in FUNCTIONS:
                node = self.function(val)
            else:
                node = self.letter(val)
        elif kind == "cmd":
            node = self.command(val)
        elif kind == "op" and val in ("(", "[", "{"):
            node = self.group({"(": ")", "{": "}", "[": "]"}[val])
        elif kind == "op" and val == "|":
            self.abs_depth += 1
            inner = self.expr()
            self.expect("op", "|")
            self.abs_depth -= 1
            node = ("abs", inner)
        if node is None:
            raise ParseError(f"unexpected {val!r}")
        self.depth -= 1
        return node

    def _maybe_mixed(self, whole):
        saved = (self.i, list(self.toks))
        self.i += 1
        try:
            num, den = self.latex_arg(), self.latex_arg()
        except ParseError:
            num = den = None
        if all(x is not None and x[0] == "num" and not x[2] and x[1].denominator == 1 for x in (num, den)):
            return ("add", (whole, ("div", num, den)))
        self.i, self.toks = saved
        return whole

    def command(self, name):
        if name in ("frac", "dfrac", "tfrac", "cfrac"):
            num = self.latex_arg()
            den = self.latex_arg()
            return ("div", num, den)
        if name in ("binom", "dbinom", "tbinom"):
            return ("binom", self.latex_arg(), self.latex_arg())
        if name == "sqrt":
            index = ("num", Fraction(2), False)
            if self.accept("op", "["):
                index = self.group("]")
            return ("root", self.latex_arg(), index)
        if name == "pi":
            return ("const", "pi")
        if name in ("infty", "infinity"):
            return ("const", "oo")
        if name in GREEK:
            return ("sym", name)
        if name in FUNCTIONS:
            return self.function(name)
        raise ParseError(f"unsupported command \\{name}")

    def function(self, name):
        power = None
        if self.accept("op", "^"):  # \sin^2 x
            power = self.latex_arg()
        base = None
        if name == "log" and self.accept("op", "_"):
            base = self.latex_arg()
        arg = self.func_arg()
        node = ("log", arg, base) if name in ("log", "ln") else ("fn", name, arg)
        return ("pow", node, power) if power is not None else node


def parse_math(s):
    """Parse one scalar expression to the tuple AST. Raises ParseError on anything outside the grammar."""
    return _Parser(tokenize(s)).parse()


# ---------------------------------------------------------------- exact rational evaluation

def _check(q):
    if q.numerator.bit_length() > MAX_BITS or q.denominator.bit_length() > MAX_BITS:
        raise NotExact("too large")
    return q


def _int_root(q, n):
    """The exact n-th root of a non-negative Fraction if it is rational, else NotExact."""
    if q < 0 or n > 64:
        raise NotExact("no real rational root")
    out = []
    for part in (q.numerator, q.denominator):
        r = round(part ** (1.0 / n)) if part.bit_length() < 1000 else None
        if r is None:
            raise NotExact("too large")
        for cand in (r - 1, r, r + 1):
            if cand >= 0 and cand ** n == part:
                out.append(cand)
                break
        else:
            raise NotExact("irrational root")
    return Fraction(out[0], out[1])


def _pow(base, exp):
    if exp.denominator == 1:
        e = exp.numerator
        if base == 0 and e < 0:
            raise NotExact("division by zero")
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if size > 1 and abs(e) * size > MAX_BITS:  # refuse before computing: 9**9**9**9 never runs
            raise NotExact("too large")
        return base ** e
    if exp.denominator > 64 or abs(exp.numerator) > 64:
        raise NotExact("non-integer power")
    root = _int_root(base, exp.denominator)
    return _pow(root, Fraction(exp.numerator))


def exact_value(node):
    """The exact Fraction value of a tree made of numbers, + - * /, integer powers, rational roots of
    perfect powers, factorials and binomials; NotExact otherwise (symbols, pi, irrational, too big)."""
    op = node[0]
    if op == "num":
        return node[1]
    if op == "add":
        return _check(sum((exact_value(c) for c in node[1]), Fraction(0)))
    if op == "mul":
        out = Fraction(1)
        for c in node[1]:
            out = _check(out * exact_value(c))
        return out
    if op == "neg":
        return -exact_value(node[1])
    if op == "div":
        den = exact_value(node[2])
        if den == 0:
            raise NotExact("division by zero")
        return _check(exact_value(node[1]) / den)
    if op == "pow":
        return _check(_pow(exact_value(node[1]), exact_value(node[2])))
    if op == "root":
        n = exact_value(node[2])
        if n.denominator != 1 or not 1 <= n.numerator <= 64:
            raise NotExact("bad root")
        return _int_root(exact_value(node[1]), n.numerator)
    if op == "fact":
        v = exact_value(node[1])
        if v.denominator != 1 or not 0 <= v.numerator <= MAX_FACTORIAL:
            raise NotExact("factorial out of range")
        return Fraction(math.factorial(v.numerator))
    if op == "binom":
        a, b = exact_value(node[1]), exact_value(node[2])
        if a.denominator != 1 or b.denominator != 1 or not 0 <= a.numerator <= MAX_FACTORIAL:
            raise NotExact("binomial out of range")
        return Fraction(math.comb(a.numerator, b.numerator)) if b.numerator >= 0 else Fraction(0)
    if op == "abs":
        return abs(exact_value(node[1]))
    raise NotExact(op)


def has_decimal(node):
    """True when a decimal literal (3.14, .5) appears anywhere in the tree."""
    if node[0] == "num":
        return node[2]
    return any(has_decimal(c) for c in _children(node))


def _children(node):
    op = node[0]
    if op in ("add", "mul"):
        return node[1]
    if op in ("neg", "fact", "abs"):
        return (node[1],)
    if op in ("div", "pow", "root", "binom"):
        return (node[1], node[2])
    if op == "fn":
        return (node[2],)
    if op == "log":
        return (node[1],) if node[2] is None else (node[1], node[2])
    return ()


def symbols(node, out=None):
    """The set of symbol names in the tree."""
    out = set() if out is None else out
    if node[0] == "sym":
        out.add(node[1])
    for c in _children(node):
        symbols(c, out)
    return out


# ---------------------------------------------------------------- floating-point probe

class ProbeError(ArithmeticError):
    """The expression could not be evaluated in floating point at this point."""


_CONST = {"pi": math.pi, "e": math.e, "i": 1j}
_FN = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "sinh": cmath.sinh, "cosh": cmath.cosh,
       "tanh": cmath.tanh, "exp": cmath.exp, "arcsin": cmath.asin, "arccos": cmath.acos,
       "arctan": cmath.atan, "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z),
       "cot": lambda z: 1 / cmath.tan(z)}


def _finite(z):
    if not (math.isfinite(z.real) and math.isfinite(z.imag)):
        raise ProbeError("not finite")
    return z


def probe(node, env):
    """Evaluate the tree as a complex float, symbols taken from `env`; ProbeError when not finite."""
    try:
        return _finite(_probe(node, env))
    except (OverflowError, ZeroDivisionError, ValueError, TypeError) as e:
        raise ProbeError(str(e)) from None


def _probe(node, env):
    op = node[0]
    if op == "num":
        return complex(float(node[1]))
    if op == "sym":
        return env[node[1]]
    if op == "const":
        if node[1] == "oo":
            raise ProbeError("infinity")
        return complex(_CONST[node[1]])
    if op == "add":
        return _finite(sum(_probe(c, env) for c in node[1]))
    if op == "mul":
        out = 1 + 0j
        for c in node[1]:
            out = _finite(out * _probe(c, env))
        return out
    if op == "neg":
        return -_probe(node[1], env)
    if op == "div":
        return _finite(_probe(node[1], env) / _probe(node[2], env))
    if op == "pow":
        base, exp = _probe(node[1], env), _probe(node[2], env)
        if abs(exp) > 1e6:
            raise ProbeError("huge exponent")
        if exp.imag == 0 and exp.real == int(exp.real) and base.imag == 0:
            return _finite(complex(base.real ** int(exp.real)))  # real integer power, exact sign
        return _finite(base ** exp)
    if op == "root":
        base, n = _probe(node[1], env), _probe(node[2], env)
        return _finite(cmath.sqrt(base) if n == 2 else base ** (1 / n))
    if op in ("fact", "binom"):
        args = [_probe(c, env) for c in _children(node)]
        if any(a.imag != 0 or a.real != int(a.real) or not 0 <= a.real <= 170 for a in args):
            raise ProbeError("factorial domain")
        if op == "fact":
            return complex(math.factorial(int(args[0].real)))
        return complex(math.comb(int(args[0].real), int(args[1].real)))
    if op == "abs":
        return complex(abs(_probe(node[1], env)))
    if op == "fn":
        return _finite(_FN[node[1]](_probe(node[2], env)))
    if op == "log":
        arg = _probe(node[1], env)
        base = math.e if node[2] is None else _probe(node[2], env)
        return _finite(cmath.log(arg) / cmath.log(base))
    raise ProbeError(op)


def probe_points(names, count=3):
    """`count` fixed assignments of distinct pseudo-random reals, |v| in [0.3, 2.3), to the symbol names;
    signs alternate so that sqrt(x^2) and x differ."""
    names = sorted(names)
    points = []
    for k in range(count):
        env = {}
        for j, name in enumerate(names):
            # golden-ratio low-discrepancy sequence: deterministic, distinct, no RNG state
            v = 0.3 + 2.0 * (((k * len(names) + j + 1) * 0.6180339887498949 + 0.1234) % 1.0)
            env[name] = complex(-v if (k + j) % 2 else v)
        points.append(env)
    return points

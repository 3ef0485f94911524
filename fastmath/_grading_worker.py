"""The symbolic slow path of fastmath.grading, run as `python -m fastmath._grading_worker MEMORY_MB`.

Reads JSON lines {"id", "pred", "ref"} (normalised answers) on stdin and writes {"id", "verdict"} with
verdict true/false/null. The parent kills this process when a comparison exceeds its timeout; the address
space is capped with RLIMIT_AS before sympy is imported. Trees from fastmath._latex are converted to sympy
node by node (no sympify or parse_expr on text), refusing numeric powers whose value would be huge.
"""
import json
import resource
import sys
from fractions import Fraction

MAX_POW_BITS = 100_000  # refuse Integer ** Integer results larger than this
MAX_SYMBOLIC_EXP = 1000  # refuse (non-atomic)^(integer) with a larger exponent: expand would blow up


class TooBig(ValueError):
    pass


def to_sympy(node):
    """Build a sympy expression from a fastmath._latex tuple tree, with size guards."""
    import math

    import sympy as sp

    op = node[0]
    if op == "num":
        q = Fraction(node[1])
        return sp.Rational(q.numerator, q.denominator)
    if op == "sym":
        return sp.Symbol(node[1])
    if op == "const":
        return {"pi": sp.pi, "e": sp.E, "i": sp.I, "oo": sp.oo}[node[1]]
    if op == "add":
        return sp.Add(*[to_sympy(c) for c in node[1]])
    if op == "mul":
        return sp.Mul(*[to_sympy(c) for c in node[1]])
    if op == "neg":
        return -to_sympy(node[1])
    if op == "div":
        return to_sympy(node[1]) / to_sympy(node[2])
    if op == "pow":
        base, exp = to_sympy(node[1]), to_sympy(node[2])
        if exp.is_Rational and base.is_number:
            bits = sp.Abs(exp) * max(1, math.log2(float(sp.Abs(base)) + 2) if base.is_Rational else 4)
            if abs(exp.p) > MAX_POW_BITS or float(bits) > MAX_POW_BITS:
                raise TooBig("power too large")
        elif exp.is_number and not exp.is_Rational:
            if exp.is_real and float(sp.Abs(exp).evalf(20)) > MAX_POW_BITS:
                raise TooBig("power too large")
        elif exp.is_Integer and not base.is_Atom and abs(exp) > MAX_SYMBOLIC_EXP:
            raise TooBig("power too large")
        return sp.Pow(base, exp)
    if op == "root":
        n = to_sympy(node[2])
        return sp.root(to_sympy(node[1]), n) if n != 2 else sp.sqrt(to_sympy(node[1]))
    if op == "fact":
        arg = to_sympy(node[1])
        if arg.is_number and (not arg.is_Integer or arg > 5000):
            raise TooBig("factorial too large")
        return sp.factorial(arg)
    if op == "binom":
        a, b = to_sympy(node[1]), to_sympy(node[2])
        if a.is_number and (not a.is_Integer or a > 5000):
            raise TooBig("binomial too large")
        return sp.binomial(a, b)
    if op == "abs":
        return sp.Abs(to_sympy(node[1]))
    if op == "fn":
        fn = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "sec": sp.sec, "csc": sp.csc, "cot": sp.cot,
              "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "sinh": sp.sinh, "cosh": sp.cosh,
              "tanh": sp.tanh, "exp": sp.exp}[node[1]]
        return fn(to_sympy(node[2]))
    if op == "log":
        arg = to_sympy(node[1])
        return sp.log(arg) if node[2] is None else sp.log(arg, to_sympy(node[2]))
    raise ValueError(op)


def _is_zero(d):
    """True if sympy shows d == 0; else a 50-digit numeric check at three points decides."""
    import sympy as sp

    if d == 0:
        return True
    for simplifier in (sp.expand, sp.simplify):
        d2 = simplifier(d)
        if d2 == 0:
            return True
        if d2.is_number and d2.is_zero is False:
            return False
    return _numeric_close(d, sp.Integer(0), 1e-40)


def _numeric_close(a, b, tol):
    """|a - b| <= tol * max(|a|, |b|, 1e-30) at three fixed points for the free symbols (50 digits)."""
    from fastmath._latex import probe_points

    names = sorted(str(s) for s in (a.free_symbols | b.free_symbols))
    for env in probe_points(names):
        subs = {s: env[str(s)].real for s in (a.free_symbols | b.free_symbols)}
        va, vb = complex(a.evalf(50, subs=subs)), complex(b.evalf(50, subs=subs))
        scale = max(abs(va), abs(vb))
        if not (abs(va - vb) <= tol * max(scale, 1e-30)):
            return False
    return True


def symbolic(ta, tb, mode):
    """Decide a pair of trees: mode "exact" (a == b), "decimal" (rel. tolerance), "ratio" (a/b constant)."""
    import sympy as sp

    from fastmath.grading import REL_TOL

    try:
        a, b = to_sympy(ta), to_sympy(tb)
        if mode == "decimal":
            return _numeric_close(a, b, REL_TOL)
        if mode == "ratio":
            r = sp.simplify(a / b)
            return bool(r.is_number and r != 0 and r.is_finite)
        return _is_zero(a - b)
    except TooBig:
        return None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, ArithmeticError):
        return None


def main():
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.setrecursionlimit(5000)
    import sympy  # noqa: F401  (import before reporting ready, so timeouts never count the import)

    from fastmath.grading import _Comparer

    comparer = _Comparer(parse_cache={}, symbolic=symbolic)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        try:
            verdict = comparer.compare(req["pred"], req["ref"])
        except (MemoryError, RecursionError, Exception):
            verdict = None
        out.write(json.dumps({"id": req.get("id"), "verdict": verdict}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

"""Mask code as Triton text: the pattern's visibility rule lowered to kernel statements.

The window rule is patterngen.core.semantics's, evaluated on symbolic `Expr` values by
`TritonOps`, so the kernels and the oracle share one statement of NATTEN's rule; constants
fold away while the text is built.
"""
from __future__ import annotations

import math
import operator

from ...ir import Band, Blocks, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Strided, Union, Window
from ...core.semantics import window_1d, window_bounds

# Python's (and Triton's) operator precedence, lowest first, and the folding of constants.
_CMP, _OR, _AND, _ADD, _MUL, _ATOM = range(6)
_OPS = {"<": (_CMP, operator.lt), "<=": (_CMP, operator.le), ">": (_CMP, operator.gt), ">=": (_CMP, operator.ge),
        "==": (_CMP, operator.eq), "|": (_OR, operator.or_), "&": (_AND, operator.and_),
        "+": (_ADD, operator.add), "-": (_ADD, operator.sub), "*": (_MUL, operator.mul),
        "//": (_MUL, operator.floordiv), "%": (_MUL, operator.mod)}


def _const(v, c) -> bool:
    return not isinstance(v, Expr) and v == c


class Expr:
    """A Triton expression as text. Python ints and bools stay constants, so the rule's
    arithmetic on them folds away (x // 1 is x, x % 1 is 0, leader - 0 is leader)."""

    __slots__ = ("text", "level")

    def __init__(self, text: str, level: int = _ATOM):
        self.text, self.level = text, level

    def __str__(self) -> str:
        return self.text

    @staticmethod
    def binary(a, op: str, b):
        level, fold = _OPS[op]
        if not isinstance(a, Expr) and not isinstance(b, Expr):
            return fold(a, b)
        if op in ("+", "-") and not isinstance(b, Expr) and b < 0:
            op, b = ("-" if op == "+" else "+"), -b
        if ((op in ("+", "-") and _const(b, 0)) or (op in ("*", "//") and _const(b, 1))
                or (op == "&" and b is True)):
            return a
        if (op == "+" and _const(a, 0)) or (op == "*" and _const(a, 1)) or (op == "&" and a is True):
            return b
        if (op == "%" and _const(b, 1)) or (op == "*" and (_const(a, 0) or _const(b, 0))):
            return 0
        if op == "&" and (a is False or b is False):
            return False

        def operand(v, right: bool) -> str:
            # parenthesise looser operands, and tighter-or-equal ones where Python would
            # read them differently (a - (b + c)) or a reader might ((x // s) * s, (a < b) & ...)
            if isinstance(v, Expr) and v.level != _ATOM and (
                    v.level < level or (v.level == level and (right or level in (_MUL, _CMP)))):
                return f"({v})"
            return str(v)
        return Expr(f"{operand(a, False)} {op} {operand(b, True)}", level)

    def __add__(self, b): return Expr.binary(self, "+", b)
    def __radd__(self, a): return Expr.binary(a, "+", self)
    def __sub__(self, b): return Expr.binary(self, "-", b)
    def __rsub__(self, a): return Expr.binary(a, "-", self)
    def __mul__(self, b): return Expr.binary(self, "*", b)
    def __rmul__(self, a): return Expr.binary(a, "*", self)
    def __floordiv__(self, b): return Expr.binary(self, "//", b)
    def __rfloordiv__(self, a): return Expr.binary(a, "//", self)
    def __mod__(self, b): return Expr.binary(self, "%", b)
    def __rmod__(self, a): return Expr.binary(a, "%", self)
    def __and__(self, b): return Expr.binary(self, "&", b)
    def __rand__(self, a): return Expr.binary(a, "&", self)
    def __or__(self, b): return Expr.binary(self, "|", b)
    def __ror__(self, a): return Expr.binary(a, "|", self)
    def __lt__(self, b): return Expr.binary(self, "<", b)
    def __le__(self, b): return Expr.binary(self, "<=", b)
    def __gt__(self, b): return Expr.binary(self, ">", b)
    def __ge__(self, b): return Expr.binary(self, ">=", b)
    def __eq__(self, b): return Expr.binary(self, "==", b)  # type: ignore[override]
    __hash__ = None  # type: ignore[assignment]


class TritonOps:
    """The window rule's operations (see patterngen.core.semantics.TorchOps) on Triton text;
    `let` emits a statement through `bind(name, text)`, which returns the variable's name."""

    def __init__(self, bind):
        self.bind = bind

    @staticmethod
    def _call(fn: str, a, b, fold):
        if not isinstance(a, Expr) and not isinstance(b, Expr):
            return fold(a, b)
        return Expr(f"{fn}({a}, {b})")

    def minimum(self, a, b):
        return self._call("tl.minimum", a, b, min)

    def maximum(self, a, b):
        return self._call("tl.maximum", a, b, max)

    def select(self, cond, a, b):
        if not isinstance(cond, Expr):
            return a if cond else b
        return Expr(f"tl.where({cond}, {a}, {b})")

    def let(self, name: str, value):
        if not isinstance(value, Expr) or value.text.isidentifier():
            return value
        return Expr(self.bind(name, value.text))


def window_bounds_lines(L: int, w: int, s: int, causal: bool) -> list[str]:
    """Body of a kernel function `bounds(x)` returning the visible key coordinates [lo, hi] of
    query coordinate x along an undilated dimension of extent L, generated from the rule."""
    lines: list[str] = []

    def bind(name: str, text: str) -> str:
        lines.append(f"{name} = {text}")
        return name
    lo, hi = window_bounds(Expr("x"), L, w, s, causal, TritonOps(bind))
    return lines + [f"return {lo}, {hi}"]


class MaskWriter:
    """Lowers a Heads-free pattern to Triton statements computing a bool [M, N] mask
    from q [M, 1] and kv [1, N] flattened indices and the scalar off = nkv - nq. Per-query quantities (window
    centres) stay [M, 1] and per-key ones [1, N] until the final comparison."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.lines: list[str] = []
        self.n = 0
        self.coords: dict[tuple[str, int], str] = {}

    def tmp(self, expr: str) -> str:
        return self.bind("t", expr)

    def bind(self, hint: str, expr: str) -> str:
        """A new variable `<hint><n>` holding `expr`; returns its name."""
        name = f"{hint}{self.n}"
        self.n += 1
        self.lines.append(f"{name} = {expr}")
        return name

    def coord(self, side: str, dim: int) -> str:
        """Grid coordinate `dim` of the q or kv index (row-major)."""
        key = (side, dim)
        if key not in self.coords:
            shape = self.spec.q_shape if side == "q" else self.spec.kv_shape
            stride = math.prod(shape[dim + 1:])
            expr = side if stride == 1 else f"({side} // {stride})"
            if dim > 0:
                expr = f"{expr} % {shape[dim]}"
            self.coords[key] = self.tmp(expr)
        return self.coords[key]

    def lower(self, p: Pattern) -> str | None:
        """Name of a bool expression for `p`, or None when everything is visible. Causal and
        Band align the last query with the last key through the run-time `off` = nkv - nq,
        so the text never holds a length. The shift goes to the key side (per kv tile): on
        the query side the compiler hoists q + off out of the kv loop, which costs the dQ
        kernels registers (spills on sm_90)."""
        if isinstance(p, Full):
            return None
        if isinstance(p, Causal):
            return self.tmp("kv - off <= q")
        if isinstance(p, Band):
            delta = self.tmp("kv - off - q")
            return self.tmp(f"({delta} >= {-p.left}) & ({delta} <= {p.right})")
        if isinstance(p, Sink):
            return self.tmp(f"kv < {p.n}")
        if isinstance(p, Global):
            return self.tmp(f"(kv < {p.n}) | (q < {p.n})")
        if isinstance(p, Strided):
            key = "kv" if p.block == 1 else f"(kv // {p.block})"
            return self.tmp(f"{key} % {p.stride} == {p.offset}")
        if isinstance(p, Blocks):
            return self.blocks(p)
        if isinstance(p, Window):
            terms = [self.window_dim(k, *dims) for k, dims in enumerate(p.dims(self.spec.ndim))]
            return self.tmp(" & ".join(terms)) if len(terms) > 1 else terms[0]
        if isinstance(p, (Union, Intersection)):
            parts = [self.lower(c) for c in p.parts]
            if isinstance(p, Union):
                return None if None in parts else self.tmp(" | ".join(parts))
            parts = [x for x in parts if x is not None]
            return None if not parts else (parts[0] if len(parts) == 1 else self.tmp(" & ".join(parts)))
        raise NotImplementedError(f"triton backend: no mask lowering for {p!r}")

    def blocks(self, p: Blocks) -> str:
        """Same block floor((x - shift) / size) along every dimension, with only non-negative
        operands of `//`: a grid's coordinates plus size - shift; on 1-D, the query position
        q + off (negative when Nq > Nkv: off is taken on the query side here, since a block
        boundary does not move with it) plus a multiple of size above 2**30 (positions below
        2**30 tokens stay in int32)."""
        if self.spec.ndim == 1:
            (size, shift), = p.dims(1)
            base = size * ((1 << 30) // size + 1) - shift
            return self.tmp(f"((q + off + {base}) // {size}) == ((kv + {base}) // {size})")
        terms = []
        for k, (size, shift) in enumerate(p.dims(self.spec.ndim)):
            qc, kc = self.coord("q", k), self.coord("kv", k)
            terms.append(self.tmp(f"(({qc} + {size - shift}) // {size}) == (({kc} + {size - shift}) // {size})"))
        return self.tmp(" & ".join(terms)) if len(terms) > 1 else terms[0]

    def window_dim(self, k: int, w: int, s: int, d: int, causal: bool) -> str:
        """NATTEN's rule along dimension k, generated from patterngen.core.semantics.window_1d."""
        i, j = Expr(self.coord("q", k)), Expr(self.coord("kv", k))
        vis = window_1d(i, j, self.spec.q_shape[k], w, s, d, causal, TritonOps(self.bind))
        return self.tmp(str(vis))


def mask_lines(pattern: Pattern | None, spec: Spec) -> list[str]:
    """Statements of a `visible_<group>` function; None is the empty pattern."""
    if pattern is None:
        return ["return (q < 0) & (kv < 0)"]
    w = MaskWriter(spec)
    expr = w.lower(pattern)
    # broadcasting with (q >= 0) & (kv >= 0) gives every group the same [M, N] shape
    w.lines.append("return (q >= 0) & (kv >= 0)" + (f" & {expr}" if expr else ""))
    return w.lines

"""Closed-form kv-tile ranges of a q tile, derived with sympy, so a kernel needs no index table.

For patterns on the flattened index (Causal, Band, Sink, Full and their
intersections, plus one union with a sink-like prefix) the kv tiles that q tile
`qt` visits form at most two ranges, each split into partial / full / partial
parts. The bounds come from solving the pattern's linear inequalities for the
kv tile index j and rounding with floor/ceiling. Every derived range set is
checked against the exact plan on every q tile before it is used; a pattern
whose ranges disagree keeps its table.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp
import torch

from ...ir import Band, Causal, Full, Intersection, Pattern, Sink, Spec, Union
from ...core.statuses import expand_ranges
from ...analysis.plan import TilePlan

qt, j = sp.symbols("qt j", integer=True)


@dataclass(frozen=True)
class Segment:
    """kv tiles lo..hi (inclusive) of q tile `qt`, of which flo..fhi need no mask."""

    lo: sp.Expr
    hi: sp.Expr
    flo: sp.Expr
    fhi: sp.Expr


def _solve(lhs: sp.Expr, rhs: sp.Expr, upper: bool) -> sp.Expr:
    """Tightest integer bound on j from lhs(j) <= rhs (upper) or lhs(j) >= rhs (lower); lhs increases in j."""
    x = sp.Symbol("x", real=True)  # the boundary is rarely an integer
    root = sp.solve(sp.Eq(lhs.subs(j, x), rhs), x)[0]
    return sp.floor(root) if upper else sp.ceiling(root)


def _leaf(node: Pattern, spec: Spec, bm: int, bn: int) -> Segment | None:
    tk = -(-spec.nkv // bn)
    last = tk - 1
    q_lo, q_hi = qt * bm, sp.Min(qt * bm + bm - 1, spec.nq - 1)
    kv_lo, kv_hi = j * bn, (j + 1) * bn - 1  # the last kv tile is checked by the plan comparison
    off = spec.nkv - spec.nq
    if isinstance(node, Full):
        return Segment(sp.Integer(0), sp.Integer(last), sp.Integer(0), sp.Integer(last))
    if isinstance(node, Sink):
        return Segment(sp.Integer(0), sp.Min(last, _solve(kv_lo, node.n - 1, True)), sp.Integer(0),
                       _solve(kv_hi, node.n - 1, True))
    if isinstance(node, (Band, Causal)):
        right = 0 if isinstance(node, Causal) else node.right
        hi = sp.Min(last, _solve(kv_lo - q_hi - off, right, True))  # some pair within the right edge
        fhi = _solve(kv_hi - q_lo - off, right, True)  # every pair within it
        if isinstance(node, Causal):
            return Segment(sp.Integer(0), hi, sp.Integer(0), fhi)
        lo = sp.Max(0, _solve(kv_hi - q_lo - off, -node.left, False))
        flo = _solve(kv_lo - q_hi - off, -node.left, False)
        return Segment(lo, hi, flo, fhi)
    return None


def segments(pattern: Pattern, spec: Spec, bm: int, bn: int) -> list[Segment] | None:
    """At most two disjoint segments covering the pattern's kv tiles, or None."""
    if isinstance(pattern, Intersection):
        unions = [p for p in pattern.parts if isinstance(p, Union)]
        if unions:  # (a | b) & c = (a & c) | (b & c)
            rest = [p for p in pattern.parts if p is not unions[0]]
            return segments(Union.of(*(Intersection.of(u, *rest) for u in unions[0].parts)), spec, bm, bn)
        parts = [segments(p, spec, bm, bn) for p in pattern.parts]
        if any(p is None or len(p) != 1 for p in parts):
            return None
        ss = [p[0] for p in parts]
        return [Segment(sp.Max(*[s.lo for s in ss]), sp.Min(*[s.hi for s in ss]),
                        sp.Max(*[s.flo for s in ss]), sp.Min(*[s.fhi for s in ss]))]
    if isinstance(pattern, Union):
        parts = [segments(p, spec, bm, bn) for p in pattern.parts]
        if len(parts) != 2 or any(p is None or len(p) != 1 for p in parts):
            return None
        fixed = [p[0] for p in parts if p[0].lo == 0]  # a prefix such as a sink
        if not fixed:
            return None
        prefix = fixed[0]
        rest = parts[1][0] if parts[0][0] is prefix else parts[0][0]
        start = sp.Max(rest.lo, prefix.hi + 1)  # tiles the prefix already visits are not visited again
        return [prefix, Segment(start, rest.hi, sp.Max(rest.flo, start), rest.fhi)]
    leaf = _leaf(pattern, spec, bm, bn)
    return None if leaf is None else [leaf]


class _Printer(sp.printing.str.StrPrinter):
    """Integer code shared by the kernel and the host check: floordiv/ceildiv/minimum/maximum calls."""

    def _print_floor(self, e):
        num, den = sp.fraction(sp.together(e.args[0]))
        return f"floordiv({self._print(sp.expand(num))}, {self._print(den)})"

    def _print_ceiling(self, e):
        num, den = sp.fraction(sp.together(e.args[0]))
        return f"-floordiv({self._print(sp.expand(-num))}, {self._print(den)})"

    def _fold(self, name, args):
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{name}({out}, {self._print(a)})"
        return out

    def _print_Min(self, e):
        return self._fold("minimum", e.args)

    def _print_Max(self, e):
        return self._fold("maximum", e.args)


def to_code(expr: sp.Expr) -> str:
    return _Printer().doprint(expr)


def _evaluate(code: str, tiles: torch.Tensor) -> torch.Tensor:
    ns = {"qt": tiles, "floordiv": lambda a, b: torch.as_tensor(a) // b,
          "minimum": lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)),
          "maximum": lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b))}
    return torch.as_tensor(eval(code, ns)).expand(tiles.shape)  # noqa: S307 - our own printed expression


@functools.lru_cache(maxsize=256)
def _segment_code(pattern: Pattern, spec: Spec, bm: int, bn: int) -> tuple[dict, ...] | None:
    """The printed segments, derived once per (pattern, spec, tiles): sympy is the slow part,
    and autotuning builds a kernel per candidate configuration of the same tiling."""
    segs = segments(pattern, spec, bm, bn)
    return None if segs is None else tuple({k: to_code(getattr(s, k)) for k in ("lo", "hi", "flo", "fhi")}
                                           for s in segs)


def closed_form(pattern: Pattern, spec: Spec, bm: int, bn: int, plan: TilePlan) -> list[dict] | None:
    """Kernel-ready segments (code strings), or None unless they visit exactly the plan's
    tiles, each once, and call a tile full only where the plan does. (A full tile may
    come out partial where a sink prefix overlaps a window: correct, merely masked.)"""
    code = _segment_code(pattern, spec, bm, bn)
    if code is None:
        return None
    tiles = torch.arange(plan.num_q_tiles)
    rows, cols, full = [], [], []
    for c in code:
        lo, hi, flo, fhi = (_evaluate(c[k], tiles) for k in ("lo", "hi", "flo", "fhi"))
        r, k = expand_ranges(lo, hi)
        rows.append(r)
        cols.append(k)
        full.append((k >= torch.maximum(flo, lo)[r]) & (k <= torch.minimum(fhi, hi)[r]))
    rows, cols, full = torch.cat(rows), torch.cat(cols), torch.cat(full)
    order = torch.argsort(rows * -(-spec.nkv // bn) + cols)
    q, k, f = plan.pairs()
    same = len(order) == len(k) and torch.equal(rows[order], q) and torch.equal(cols[order], k)
    return list(code) if same and not (full[order] & ~f).any() else None

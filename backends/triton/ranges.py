"""Closed-form kv-tile ranges of a q tile, derived with sympy, so a kernel needs no index table.

For patterns on the flattened index (Causal, Band, Sink, Full and their
intersections, plus one union with a sink-like prefix) the kv tiles that q tile
`qt` visits form at most two ranges, each split into partial / full / partial
parts. The bounds come from solving the pattern's linear inequalities for the
kv tile index j and rounding with floor/ceiling, with the lengths `nq` and `nkv`
as symbols: the printed code is the kernel's, reading its run-time `nq` and `nkv`,
so one derivation (per pattern and tile sizes) serves every length. The full span
stops before a ragged last kv tile (which the walk then masks), as in the kernel
plans (tables.kernel_plan).

Ranges are used only once checked against exact plans: a fixed spec's own plan, or
for a length-free spec the plans of a sample of lengths that reaches the edge cases
(`sample_lengths`); a pattern whose ranges disagree anywhere keeps its tables.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp
import torch

from ...ir import Band, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Union
from ...core.tiles import TileGrid
from ...analysis.plan import TilePlan
from .tables import group_plans, segment_pairs

qt, j = sp.symbols("qt j", integer=True)
nq, nkv = sp.symbols("nq nkv", integer=True, positive=True)

SAMPLE_MAX = 2048
"""Largest length the sample takes from a pattern's constants (Sink(n), Band(left, right))."""


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


def _leaf(node: Pattern, bm: int, bn: int) -> Segment | None:
    last = sp.floor((nkv - 1) / bn)  # the last kv tile
    q_lo, q_hi = qt * bm, sp.Min(qt * bm + bm - 1, nq - 1)
    kv_lo, kv_hi = j * bn, (j + 1) * bn - 1
    off = nkv - nq  # bottom-right alignment
    if isinstance(node, Full):
        return Segment(sp.Integer(0), last, sp.Integer(0), last)
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


def _segments(pattern: Pattern, bm: int, bn: int) -> list[Segment] | None:
    if isinstance(pattern, Intersection):
        unions = [p for p in pattern.parts if isinstance(p, Union)]
        if unions:  # (a | b) & c = (a & c) | (b & c)
            rest = [p for p in pattern.parts if p is not unions[0]]
            return _segments(Union.of(*(Intersection.of(u, *rest) for u in unions[0].parts)), bm, bn)
        parts = [_segments(p, bm, bn) for p in pattern.parts]
        if any(p is None or len(p) != 1 for p in parts):
            return None
        ss = [p[0] for p in parts]
        return [Segment(sp.Max(*[s.lo for s in ss]), sp.Min(*[s.hi for s in ss]),
                        sp.Max(*[s.flo for s in ss]), sp.Min(*[s.fhi for s in ss]))]
    if isinstance(pattern, Union):
        parts = [_segments(p, bm, bn) for p in pattern.parts]
        if len(parts) != 2 or any(p is None or len(p) != 1 for p in parts):
            return None
        fixed = [p[0] for p in parts if p[0].lo == 0]  # a prefix such as a sink
        if not fixed:
            return None
        prefix = fixed[0]
        rest = parts[1][0] if parts[0][0] is prefix else parts[0][0]
        start = sp.Max(rest.lo, prefix.hi + 1)  # tiles the prefix already visits are not visited again
        return [prefix, Segment(start, rest.hi, sp.Max(rest.flo, start), rest.fhi)]
    leaf = _leaf(pattern, bm, bn)
    return None if leaf is None else [leaf]


def segments(pattern: Pattern, bm: int, bn: int) -> list[Segment] | None:
    """At most two disjoint segments covering the pattern's kv tiles for q tile `qt` and any
    lengths `nq`, `nkv`, or None. A full span ends at the last complete kv tile."""
    segs = _segments(pattern, bm, bn)
    complete = sp.floor(nkv / bn) - 1  # the last kv tile with bn keys
    return None if segs is None else [Segment(s.lo, s.hi, s.flo, sp.Min(s.fhi, complete)) for s in segs]


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


@functools.lru_cache(maxsize=256)
def _segment_code(pattern: Pattern, bm: int, bn: int) -> tuple[dict, ...] | None:
    """The printed segments, derived once per (pattern, tiles) for every length: sympy is the
    slow part, and autotuning builds a kernel per candidate configuration of the same tiling."""
    segs = segments(pattern, bm, bn)
    return None if segs is None else tuple({k: to_code(getattr(s, k)) for k in ("lo", "hi", "flo", "fhi")}
                                           for s in segs)


def agrees(code: tuple[dict, ...], plan: TilePlan, nq_: int, nkv_: int, bn: int) -> bool:
    """Whether the segments visit exactly the plan's tiles at these lengths, each once, and
    call a tile full only where the plan does. (A full tile may come out partial where a
    sink prefix overlaps a window: correct, merely masked.)"""
    rows, cols, full = segment_pairs(code, plan.num_q_tiles, nq_, nkv_, bn)
    q, k, f = plan.pairs()
    same = len(rows) == len(k) and torch.equal(rows, q) and torch.equal(cols, k)
    return same and not bool((full & ~f).any())


def _constants(pattern: Pattern) -> set[int]:
    """The lengths at which the pattern's own edges sit: Sink and Global sizes, band widths."""
    out = set()
    for node in pattern.walk():
        if isinstance(node, (Sink, Global)):
            out.add(node.n)
        elif isinstance(node, Band):
            out.update((node.left, node.right))
    return out


def sample_lengths(pattern: Pattern, bm: int, bn: int) -> list[tuple[int, int]]:
    """The (nq, nkv) a length-free spec's segments are checked at: every pair of 1, 2, a tile
    less one, a tile, a tile plus one (of both tile sizes), 2 * bn + 3, a few tiles and a few
    hundred tokens (so nq < nkv, nq == nkv and nq > nkv, ragged and whole tiles, one tile and
    many), and each of the pattern's constants c, c + 1 and c + bn + 1 against 1, itself, a
    tile plus one and a few hundred."""
    base = {1, 2, bm - 1, bm, bm + 1, bn - 1, bn, bn + 1, 2 * bn + 3, 3 * bm + bn // 2 + 1, 300}
    base = sorted(v for v in base if v >= 1)
    pairs = {(a, b) for a in base for b in base}
    for c in _constants(pattern):
        for v in (c, c + 1, c + bn + 1):
            if 1 <= v <= SAMPLE_MAX:
                pairs.update((x, y) for w in (1, v, bm + 1, bn + 1, 300) for x, y in ((v, w), (w, v)))
    return sorted(pairs)


@functools.lru_cache(maxsize=256)
def _checked_for_any_length(pattern: Pattern, bm: int, bn: int) -> tuple[dict, ...] | None:
    code = _segment_code(pattern, bm, bn)
    if code is None:
        return None
    for a, b in sample_lengths(pattern, bm, bn):
        spec = Spec(pattern, (a,), (b,))  # the static part's plan at these lengths (what spec.bind plans)
        plan = group_plans(spec, [pattern], TileGrid((a,), bm), TileGrid((b,), bn))[0]
        if not agrees(code, plan, a, b, bn):
            return None
    return code


def closed_form(pattern: Pattern, bm: int, bn: int, plan: TilePlan | None = None,
                lengths: tuple[int, int] | None = None) -> list[dict] | None:
    """Kernel-ready segments (code strings), or None. With `plan` (the kernel plan of a fixed
    spec at `lengths`) they must agree with it (`agrees`); without, they must agree with the
    exact kernel plans at every `sample_lengths` (checked once per pattern and tiles)."""
    if plan is None:
        code = _checked_for_any_length(pattern, bm, bn)
        return None if code is None else list(code)
    code = _segment_code(pattern, bm, bn)
    return None if code is None or not agrees(code, plan, *lengths, bn) else list(code)

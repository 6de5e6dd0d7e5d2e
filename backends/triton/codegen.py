"""Render Triton kernels from a plan through the Jinja templates, and cache them on disk.

The Python here decides *what* to emit: mask expressions derived from the pattern
(NATTEN's window rule is patterngen.core.semantics's, emitted as Triton text by TritonOps), tile
geometry as constants, and the kv walk of each kernel (`Walk`); the templates hold the
kernel text and read those named values.
"""
from __future__ import annotations

import importlib.resources
import math
import operator
from dataclasses import dataclass

import jinja2

from ...ir import (Band, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Strided, Union, Window)
from ...core.semantics import window_1d, window_bounds
from ...core.tiles import TileGrid
from ...version import __version__

# -- Triton expression text for the shared window rule (patterngen.core.semantics) -----------
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
    from q [M, 1] and kv [1, N] flattened indices. Per-query quantities (window
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
        """Name of a bool expression for `p`, or None when everything is visible."""
        offset = self.spec.nkv - self.spec.nq
        shift = f" + {offset}" if offset > 0 else (f" - {-offset}" if offset < 0 else "")
        if isinstance(p, Full):
            return None
        if isinstance(p, Causal):
            return self.tmp(f"kv <= q{shift}")
        if isinstance(p, Band):
            delta = self.tmp(f"kv - (q{shift})")
            return self.tmp(f"({delta} >= {-p.left}) & ({delta} <= {p.right})")
        if isinstance(p, Sink):
            return self.tmp(f"kv < {p.n}")
        if isinstance(p, Global):
            return self.tmp(f"(kv < {p.n}) | (q < {p.n})")
        if isinstance(p, Strided):
            return self.tmp(f"kv % {p.stride} == {p.offset}")
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


@dataclass(frozen=True)
class TileDims:
    extent: int
    stride: int
    tile: int
    count: int
    inner: int
    tile_stride: int
    ragged: bool


def tile_context(name: str, grid: TileGrid) -> dict:
    """What the template needs to address a tile's tokens straight from the row-major layout."""
    ctx = {"name": name, "flat": grid.flat, "n": grid.n, "even": grid.n % grid.volume == 0 if grid.flat else
           all(s % t == 0 for s, t in zip(grid.shape, grid.tile))}
    if grid.flat:
        ctx["describe"] = f"{grid.tile} consecutive tokens"
        return ctx
    ctx["describe"] = "x".join(map(str, grid.tile)) + " boxes of a " + "x".join(map(str, grid.shape)) + " grid"
    ctx["dims"] = [TileDims(extent=s, stride=grid.strides[k], tile=t, count=c,
                            inner=math.prod(grid.tile[k + 1:]), tile_stride=math.prod(grid.counts[k + 1:]),
                            ragged=s % t != 0)
                   for k, (s, t, c) in enumerate(zip(grid.shape, grid.tile, grid.counts))]
    return ctx


_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(importlib.resources.files("patterngen.templates"))), trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def window_context(pattern: Pattern | None, spec: Spec, q_grid: TileGrid, kv_grid: TileGrid) -> dict | None:
    """Per-dimension constants for table-free neighbourhood loops: a single undilated Window on
    box tiles (or 1-D tiles) of one grid; None otherwise. `bounds` is the body of the kernel's
    bounds function along the dimension, generated from the window rule."""
    if not isinstance(pattern, Window) or spec.q_shape != spec.kv_shape or spec.routed is not None:
        return None
    if len(spec.q_shape) > 1 and (q_grid.flat or kv_grid.flat):
        return None
    dims = pattern.dims(spec.ndim)
    if any(d != 1 for _, _, d, _ in dims):
        return None
    qt = (q_grid.tile,) if q_grid.flat else q_grid.tile
    kt = (kv_grid.tile,) if kv_grid.flat else kv_grid.tile
    return {"dims": [{"L": L, "w": w, "s": s, "causal": c, "bounds": window_bounds_lines(L, w, s, c),
                      "tq": tq, "tk": tk, "q_count": q_grid.counts[k], "k_count": kv_grid.counts[k],
                      "q_tile_stride": math.prod(q_grid.counts[k + 1:]), "q_stride": math.prod(spec.q_shape[k + 1:])}
                     for k, ((w, s, _, c), L, tq, tk) in enumerate(zip(dims, spec.q_shape, qt, kt))]}


@dataclass(frozen=True)
class Walk:
    """How a kernel reaches the kv tiles of its q tile, decided here; the templates read
    `walk` (the name) and the data of that walk, and decide nothing.

    - table: the plan's index table, ROWS[group, q tile] into COLS, full tiles first.
    - routed: the table, then the run-time blocks IDX[b, h, q tile] not yet visited.
    - closed_form: `segments`, kv-tile ranges as expressions of the q tile (ranges.py).
    - window: `window`, the neighbourhood per dimension from the window rule.
    - tile_union (head-routed kernels): the kv tiles of the q tiles a compacted row tile
      draws from, from the tile-class table.
    """

    name: str
    window: dict | None = None
    segments: tuple | None = None


def forward_walk(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid,
                 segments: list[dict] | None = None) -> Walk:
    """The forward's walk: an undilated window's neighbourhood, else closed-form `segments`
    (see ranges.closed_form), else the index table (with routed blocks for Routed specs)."""
    window = window_context(patterns[0], spec, q_grid, kv_grid) if len(patterns) == 1 else None
    if window is not None:
        return Walk("window", window=window)
    if segments:
        return Walk("closed_form", segments=tuple(segments))
    return Walk("table" if spec.routed is None else "routed")


def backward_walk(spec: Spec) -> Walk:
    """The dQ kernel walks the forward's table (and routed blocks); dK/dV its transpose."""
    return Walk("table" if spec.routed is None else "routed")


def heads_walk(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid) -> Walk:
    """The head-routed forward and dQ: an undilated window's neighbourhood of the rows'
    bounding box, else the union of their q tiles' kv tiles (needs the tile-class table)."""
    window = window_context(patterns[0], spec, q_grid, kv_grid) if len(patterns) == 1 else None
    return Walk("tile_union") if window is None else Walk("window", window=window)


def _groups(patterns: list[Pattern | None], spec: Spec) -> list[dict]:
    """One mask function per group of heads (None: a group whose static part is empty)."""
    return [{"index": i, "pattern": "nothing" if p is None else repr(p), "mask_lines": mask_lines(p, spec)}
            for i, p in enumerate(patterns)]


def _routed_context(spec: Spec) -> dict | None:
    """What the templates need of a Routed node: its causal flag and the q -> kv index offset."""
    return None if spec.routed is None else {"causal": spec.routed.causal, "offset": spec.nkv - spec.nq}


def _render(template: str, spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid,
            walk: Walk, **extra) -> str:
    return _env.get_template(template).render(
        version=__version__, spec_repr=repr(spec), nq=spec.nq, groups=_groups(patterns, spec),
        routed=_routed_context(spec), walk=walk.name, window=walk.window, segments=walk.segments,
        q=tile_context("q", q_grid), kv=tile_context("kv", kv_grid), **extra)


def render_forward(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid,
                   walk: Walk | None = None) -> str:
    """The forward kernel module: one mask function per group of heads (`patterns`,
    the static part of each group's pattern), tile addressing, and the kv walk (see
    `forward_walk`, its default)."""
    walk = walk or forward_walk(spec, patterns, q_grid, kv_grid)
    return _render("attention_fwd.jinja", spec, patterns, q_grid, kv_grid, walk)


def render_backward(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid) -> str:
    """The backward kernels (delta preprocessing, dK/dV over the transposed plan, dQ) with the
    same mask functions and tile addressing as the forward."""
    return _render("attention_bwd.jinja", spec, patterns, q_grid, kv_grid, backward_walk(spec),
                   q_parts=2 if spec.head_dim > 64 else 1)


def render_heads(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid,
                 walk: Walk | None = None) -> str:
    """The head-routed kernels (token compaction, forward, dQ, dK/dV over compacted q tiles)
    with the same mask functions, tile addressing and kv-tile steps as the dense-head ones."""
    walk = walk or heads_walk(spec, patterns, q_grid, kv_grid)
    return _render("attention_heads.jinja", spec, patterns, q_grid, kv_grid, walk)

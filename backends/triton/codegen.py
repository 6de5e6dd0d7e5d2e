"""Render Triton kernels from a plan through the Jinja templates, and cache them on disk.

The Python here decides *what* to emit (mask expressions derived from the
pattern, tile geometry as constants); the template holds the kernel text.
"""
from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass

import jinja2

from ...ir import (Band, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Strided, Union, Window)
from ...tiles import TileGrid



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
        name = f"t{self.n}"
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
        """NATTEN's rule along dimension k (see patterngen.semantics.window_1d)."""
        L = self.spec.q_shape[k]
        i, j = self.coord("q", k), self.coord("kv", k)
        x, y = (i, j) if d == 1 else (self.tmp(f"{i} // {d}"), self.tmp(f"{j} // {d}"))
        if d == 1 or L % d == 0:
            last = f"{L // d - 1}"
        else:
            last = self.tmp(f"{L // d - 1} + ({i} % {d} < {L % d}).to(tl.int32)")
        start = x if s == 1 else f"({x} // {s}) * {s}"
        if causal:
            leader = self.tmp(f"tl.minimum({start} + {s - 1}, {last})")
            vis = f"({y} <= {x}) & ({leader} - {y} < {w})"
        else:
            wl, wr = w // 2, w // 2 + w % 2 - 1
            leader = self.tmp(f"tl.minimum({start} + {s // 2}, {last})")
            centre = self.tmp(f"tl.maximum(tl.minimum({leader}, {last} - {wr}), {wl})")
            vis = f"({y} >= {centre} - {wl}) & ({y} <= {centre} + {wr})"
        if d > 1:
            vis = f"{vis} & ({i} % {d} == {j} % {d})"
        return self.tmp(vis)


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
    box tiles (or 1-D tiles) of one grid; None otherwise."""
    if not isinstance(pattern, Window) or spec.q_shape != spec.kv_shape or spec.routed is not None:
        return None
    if len(spec.q_shape) > 1 and (q_grid.flat or kv_grid.flat):
        return None
    dims = pattern.dims(spec.ndim)
    if any(d != 1 for _, _, d, _ in dims):
        return None
    qt = (q_grid.tile,) if q_grid.flat else q_grid.tile
    kt = (kv_grid.tile,) if kv_grid.flat else kv_grid.tile
    return {"dims": [{"L": L, "w": w, "s": s, "causal": c, "wl": w // 2, "wr": w // 2 + w % 2 - 1,
                      "tq": tq, "tk": tk, "q_count": q_grid.counts[k], "k_count": kv_grid.counts[k],
                      "q_tile_stride": math.prod(q_grid.counts[k + 1:]), "q_stride": math.prod(spec.q_shape[k + 1:])}
                     for k, ((w, s, _, c), L, tq, tk) in enumerate(zip(dims, spec.q_shape, qt, kt))]}


def _groups(patterns: list[Pattern | None], spec: Spec) -> list[dict]:
    """One mask function per group of heads (None: a group whose static part is empty)."""
    return [{"index": i, "pattern": "nothing" if p is None else repr(p), "mask_lines": mask_lines(p, spec)}
            for i, p in enumerate(patterns)]


def _routed_context(spec: Spec) -> dict | None:
    """What the templates need of a Routed node: its causal flag and the q -> kv index offset."""
    return None if spec.routed is None else {"causal": spec.routed.causal, "offset": spec.nkv - spec.nq}


def render_forward(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid,
                   segments: list[dict] | None = None) -> str:
    """The forward kernel module: one mask function per group of heads (`patterns`,
    the static part of each group's pattern), tile addressing, and, for Routed
    specs, the run-time block loop. `segments` (see ranges.py) and undilated windows
    replace the index table by closed-form kv-tile ranges."""
    from ... import __version__
    groups = _groups(patterns, spec)
    return _env.get_template("attention_fwd.jinja").render(
        version=__version__, spec_repr=repr(spec), nq=spec.nq, groups=groups, routed=_routed_context(spec),
        q_parts=2 if spec.head_dim > 64 else 1,
        segments=segments,
        window=window_context(patterns[0], spec, q_grid, kv_grid) if len(patterns) == 1 else None,
        q=tile_context("q", q_grid), kv=tile_context("kv", kv_grid))


def render_backward(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid) -> str:
    """The backward kernels (delta preprocessing, dK/dV over the transposed plan, dQ) with the
    same mask functions and tile addressing as the forward."""
    from ... import __version__
    groups = _groups(patterns, spec)
    return _env.get_template("attention_bwd.jinja").render(
        version=__version__, spec_repr=repr(spec), nq=spec.nq, groups=groups, routed=_routed_context(spec),
        q_parts=2 if spec.head_dim > 64 else 1,
        q=tile_context("q", q_grid), kv=tile_context("kv", kv_grid))


def render_heads(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid, kv_grid: TileGrid) -> str:
    """The head-routed kernels (token compaction, forward, dQ, dK/dV over compacted q tiles)
    with the same mask functions, tile addressing and kv-tile steps as the dense-head ones."""
    from ... import __version__
    groups = _groups(patterns, spec)
    return _env.get_template("attention_heads.jinja").render(
        version=__version__, spec_repr=repr(spec), nq=spec.nq, groups=groups, routed=None,
        window=window_context(patterns[0], spec, q_grid, kv_grid) if len(patterns) == 1 else None,
        q=tile_context("q", q_grid), kv=tile_context("kv", kv_grid))

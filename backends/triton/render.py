"""Render the kernel modules through the Jinja templates.

The Python here decides *what* to emit: the mask function of each group of heads
(masks.py), tile geometry as constants, and the kv walk of each kernel (`Walk`); the
templates hold the kernel text and read those named values. Sequence lengths never enter
the text (they are run-time arguments), so one module serves every length; a grid's
shape does (box tiles and windows are addressed with its constants). Where a grid may be
passed, an int stands for flat tiles of that size on a sequence of any length.
"""
from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass

import jinja2

from ...ir import Pattern, Spec, Window
from ...core.tiles import TileGrid
from ...version import __version__
from .masks import mask_lines, window_bounds_lines


@dataclass(frozen=True)
class TileDims:
    extent: int
    stride: int
    tile: int
    count: int
    inner: int
    tile_stride: int
    ragged: bool


def tile_context(name: str, grid: TileGrid | int) -> dict:
    """What the template needs to address a tile's tokens: for flat tiles (an int, or a flat
    TileGrid) only the tile size, the length being a run-time argument; for boxes the grid's
    constants, straight from the row-major layout."""
    if isinstance(grid, int) or grid.flat:
        tile = grid if isinstance(grid, int) else grid.tile
        return {"name": name, "flat": True, "describe": f"{tile} consecutive tokens"}
    ctx = {"name": name, "flat": False,
           "describe": "x".join(map(str, grid.tile)) + " boxes of a " + "x".join(map(str, grid.shape)) + " grid"}
    ctx["dims"] = [TileDims(extent=s, stride=grid.strides[k], tile=t, count=c,
                            inner=math.prod(grid.tile[k + 1:]), tile_stride=math.prod(grid.counts[k + 1:]),
                            ragged=s % t != 0)
                   for k, (s, t, c) in enumerate(zip(grid.shape, grid.tile, grid.counts))]
    return ctx


_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(importlib.resources.files("patterngen.templates"))),
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)


def window_context(pattern: Pattern | None, spec: Spec, q_grid: TileGrid | int,
                   kv_grid: TileGrid | int) -> dict | None:
    """Per-dimension constants for table-free neighbourhood loops: a single undilated Window on
    box tiles (or 1-D tiles) of one fixed grid; None otherwise (a length-free spec has no
    Window). `bounds` is the body of the kernel's bounds function along the dimension,
    generated from the window rule."""
    if (not isinstance(pattern, Window) or spec.length_free or spec.q_shape != spec.kv_shape
            or spec.routed is not None):
        return None
    if len(spec.q_shape) > 1 and (q_grid.flat or kv_grid.flat):
        return None
    dims = pattern.dims(spec.ndim)
    if any(d != 1 for _, _, d, _ in dims):
        return None
    qt = (q_grid.tile,) if q_grid.flat else q_grid.tile
    kt = (kv_grid.tile,) if kv_grid.flat else kv_grid.tile
    return {"dims": [{"L": L, "w": w, "s": s, "causal": c, "bounds": window_bounds_lines(L, w, s, c),
                      "tq": tq, "tk": tk, "q_count": q_grid.counts[k],
                      "q_tile_stride": math.prod(q_grid.counts[k + 1:]),
                      "k_tile_stride": math.prod(kv_grid.counts[k + 1:]), "q_stride": math.prod(spec.q_shape[k + 1:]),
                      "k_start_stride": tk * math.prod(spec.kv_shape[k + 1:])}
                     for k, ((w, s, _, c), L, tq, tk) in enumerate(zip(dims, spec.q_shape, qt, kt))]}


@dataclass(frozen=True)
class Walk:
    """How a kernel reaches the kv tiles of its q tile, decided here; the templates read
    `walk` (the name) and the data of that walk, and decide nothing.

    - table: the plan's index table, ROWS[group, q tile] into COLS, full tiles first.
    - routed: the table, then the run-time blocks IDX[b, h, q tile] not yet visited.
    - closed_form: `segments`, kv-tile ranges as expressions of the q tile and the lengths
      (ranges.py); the work order comes from the program id, no table at all.
    - window: `window`, the neighbourhood per dimension from the window rule.
    - tile_union (head-routed kernels): the kv tiles of the q tiles a compacted row tile
      draws from, from the tile-class table.
    """

    name: str
    window: dict | None = None
    segments: tuple | None = None


def _one_window(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int,
                kv_grid: TileGrid | int) -> dict | None:
    """`window_context` of the heads' one static pattern; None where the heads have several."""
    return window_context(patterns[0], spec, q_grid, kv_grid) if len(patterns) == 1 else None


def forward_walk(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int, kv_grid: TileGrid | int,
                 segments: list[dict] | None = None) -> Walk:
    """The walk of a forward or dQ kernel on these grids: an undilated window's
    neighbourhood, else closed-form `segments` (see ranges.closed_form), else the index table
    (with routed blocks for Routed specs)."""
    window = _one_window(spec, patterns, q_grid, kv_grid)
    if window is not None:
        return Walk("window", window=window)
    if segments:
        return Walk("closed_form", segments=tuple(segments))
    return Walk("table" if spec.routed is None else "routed")


def heads_walk(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int, kv_grid: TileGrid | int) -> Walk:
    """The head-routed forward and dQ: an undilated window's neighbourhood of the rows'
    bounding box, else the union of their q tiles' kv tiles (needs the tile-class table)."""
    window = _one_window(spec, patterns, q_grid, kv_grid)
    return Walk("tile_union") if window is None else Walk("window", window=window)


def _groups(patterns: list[Pattern | None], spec: Spec) -> list[dict]:
    """One mask function per group of heads (None: a group whose static part is empty)."""
    return [{"index": i, "pattern": "nothing" if p is None else repr(p), "mask_lines": mask_lines(p, spec)}
            for i, p in enumerate(patterns)]


def _routed_context(spec: Spec) -> dict | None:
    """What the templates need of a Routed node: its causal flag (the q -> kv offset is the
    kernels' run-time off = nkv - nq)."""
    return None if spec.routed is None else {"causal": spec.routed.causal}


def _spec_text(spec: Spec) -> str:
    """The spec in the module's header: a 1-D spec without a Window in its length-free form,
    so that the text of a sequence kernel never depends on the lengths."""
    try:
        return repr(spec.unbound())
    except ValueError:  # a grid or a Window: its shape is part of the kernel
        return repr(spec)


def _render(template: str, spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int,
            kv_grid: TileGrid | int, walk: Walk, **extra) -> str:
    return _env.get_template(template).render(
        version=__version__, spec_repr=_spec_text(spec), groups=_groups(patterns, spec),
        routed=_routed_context(spec), walk=walk.name, window=walk.window, segments=walk.segments,
        q=tile_context("q", q_grid), kv=tile_context("kv", kv_grid), **extra)


def render_forward(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int, kv_grid: TileGrid | int,
                   walk: Walk) -> str:
    """The forward kernel module: one mask function per group of heads (`patterns`,
    the static part of each group's pattern), tile addressing, and the kv walk (see
    `forward_walk`)."""
    return _render("attention_fwd.jinja", spec, patterns, q_grid, kv_grid, walk)


def render_backward(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int, kv_grid: TileGrid | int,
                    dq_walk: Walk) -> str:
    """The backward kernels (delta preprocessing, dK/dV over the transposed plan, dQ) with the
    same mask functions and tile addressing as the forward; the grids are dK/dV's. `dq_walk`
    is the dQ kernel's (`forward_walk` for its own, transposed tiling); dK/dV walks the
    transposed tables (with routed blocks for Routed specs), whatever the dQ walk."""
    return _render("attention_bwd.jinja", spec, patterns, q_grid, kv_grid, dq_walk)


def render_heads(spec: Spec, patterns: list[Pattern | None], q_grid: TileGrid | int, kv_grid: TileGrid | int,
                 walk: Walk) -> str:
    """The head-routed kernels (token compaction, forward, dQ, dK/dV over compacted q tiles)
    with the same mask functions, tile addressing and kv-tile steps as the dense-head ones;
    `walk`: see `heads_walk`."""
    return _render("attention_heads.jinja", spec, patterns, q_grid, kv_grid, walk)

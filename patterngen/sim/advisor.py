"""Stride advisor: which strides (and small window tweaks) make a GNA window fully
block-sparse for given tiles, as GNA's authors chose them by hand for their models.

A box tile pair of a `Window` is visited (full) iff it is in every dimension,
so the window is fully block-sparse iff it is along every dimension, and its
tile bound is the product of per-dimension bounds. The advisor therefore
checks each dimension's (size, stride) options on its own (a 1-D question
about q tiles of `tq` and kv tiles of `tk` coordinates) and combines the
survivors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

from ..ir import Window
from ..analysis.windows import window_dim_pairs
from .counting import window_dim_visible
from .profiles import window_dim_tiles


@dataclass(frozen=True)
class StrideAdvice:
    """One window (size and stride per dimension) that is fully block-sparse for the tiles."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    q_tile: tuple[int, ...] | int
    kv_tile: tuple[int, ...] | int
    base_size: tuple[int, ...]
    tile_speedup: float
    flop_speedup: float
    visited: int
    tile_pairs: int

    @property
    def window(self) -> Window:
        """The advised pattern."""
        one = len(self.size) == 1
        pick = (lambda t: t[0]) if one else (lambda t: t)
        return Window(pick(self.size), stride=pick(self.stride), dilation=pick(self.dilation),
                      causal=pick(self.causal))

    @property
    def tweak(self) -> tuple[int, ...]:
        """Change of the window size per dimension against the requested one."""
        return tuple(a - b for a, b in zip(self.size, self.base_size))

    @property
    def fully_block_sparse(self) -> bool:
        return True

    def __str__(self):
        f = (lambda t: str(t[0])) if len(self.size) == 1 else (lambda t: "x".join(map(str, t)))
        return (f"window {f(self.size)} stride {f(self.stride)}: tile bound {self.tile_speedup:.2f}x "
                f"(= FLOP bound {self.flop_speedup:.2f}x), {self.visited} tile pairs visited")


def _as_tuple(name: str, value, ndim: int | None, minimum: int) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"advise_strides: {name} must be an int or a tuple of ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * (ndim or 1)
    if not isinstance(value, (tuple, list)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"advise_strides: {name} must be an int or a tuple of ints, got {value!r}")
    if ndim is not None and len(value) != ndim:
        raise ValueError(f"advise_strides: {name}={tuple(value)!r} has {len(value)} entries, the grid has {ndim}")
    if any(v < minimum for v in value):
        raise ValueError(f"advise_strides: {name} entries must be >= {minimum}, got {tuple(value)!r}")
    return tuple(value)


@lru_cache(maxsize=1 << 16)
def _dim_option(L: int, w: int, s: int, d: int, causal: bool, tq: int, tk: int) -> int | None:
    """Visited 1-D tile pairs if (w, s) is fully block-sparse along this dimension, else None."""
    if d > 1:
        visited, full = window_dim_tiles(L, w, s, d, causal, tq, tk)
        return int(visited.sum()) if bool((visited == full).all()) else None
    # undilated windows are intervals monotone in the query: a q tile visits every kv tile of its
    # `window_hull`, and all of them are full iff `undilated_interval_all` holds on each (`window_dim_pairs`)
    rows, _, any_, all_ = window_dim_pairs(L, w, s, d, causal, tq, tk)
    return len(rows) if bool(all_[any_].all()) else None


def advise_strides(window, grid, q_tile, kv_tile, tolerance=0, *, limit: int | None = None
                   ) -> list[StrideAdvice]:
    """Strides, and window sizes within +-`tolerance` per dimension, that make `window`
    fully block-sparse on `grid` for these q and kv tiles, each with its tile bound.

    window: a `Window` (its dilation and causality are kept, its stride is what is
        searched) or a window size (int or tuple).
    grid: the token grid (int or tuple). q_tile, kv_tile: boxes (an int on a 1-D grid).
    Sorted closest first: smallest size change, then the finest strides (nearest to
    neighborhood attention), then the highest tile bound.
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, tuple, list)):
        raise TypeError(f"advise_strides: grid must be an int or a tuple of ints, got {grid!r}")
    shape = _as_tuple("grid", grid, None, 1)
    n = len(shape)
    if isinstance(window, Window):
        if window.ndim not in (None, n):
            raise ValueError(f"advise_strides: {window!r} has {window.ndim} dimensions, the grid {shape} has {n}")
        dims = window.dims(n)
        base = tuple(w for w, _, _, _ in dims)
        dil = tuple(d for _, _, d, _ in dims)
        causal = tuple(bool(c) for _, _, _, c in dims)
    else:
        base = _as_tuple("window", window, n, 1)
        dil, causal = (1,) * n, (False,) * n
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        if n > 1 and isinstance(t, int) and not isinstance(t, bool):
            raise ValueError(f"advise_strides: {name}={t} is a flat tile; on a {n}-D grid give a box, e.g. "
                             f"{(1,) * (n - 1) + (t,)}")
    qt = _as_tuple("q_tile", q_tile, n, 1)
    kt = _as_tuple("kv_tile", kv_tile, n, 1)
    tol = _as_tuple("tolerance", tolerance, n, 0)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"advise_strides: limit must be None or an int >= 1, got {limit!r}")
    per_dim = []
    for k in range(n):
        L, d, c = shape[k], dil[k], causal[k]
        opts = []
        for w in range(base[k] - tol[k], base[k] + tol[k] + 1):
            if w < 1 or w > L or (w < 2 and w != L) or w * d > L:
                continue
            for s in range(1, w + 1):
                v = _dim_option(L, w, s, d, c, qt[k], kt[k])
                if v is not None:
                    opts.append((w, s, v, window_dim_visible(L, w, s, d, c)))
        if not opts:
            return []
        per_dim.append(opts)
    pairs_per_dim = [(-(-L // a)) * (-(-L // b)) for L, a, b in zip(shape, qt, kt)]
    total_pairs = math.prod(pairs_per_dim)
    dense = math.prod(L * L for L in shape)
    out = []
    for combo in product(*per_dim):
        size = tuple(o[0] for o in combo)
        stride = tuple(o[1] for o in combo)
        visited = math.prod(o[2] for o in combo)
        vis = math.prod(o[3] for o in combo)
        out.append(StrideAdvice(size, stride, dil, causal, qt[0] if n == 1 else qt, kt[0] if n == 1 else kt, base,
                                total_pairs / visited, dense / vis, visited, total_pairs))
    out.sort(key=lambda a: (sum(abs(t) for t in a.tweak), math.prod(a.stride), -a.tile_speedup, a.size))
    return out[:limit] if limit is not None else out


__all__ = ["advise_strides", "StrideAdvice"]

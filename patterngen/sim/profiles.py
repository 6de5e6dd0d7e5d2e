"""Tile profiles: how many kv tiles each q tile visits, and how many of those are full,
in closed form where the pattern allows, from a plan otherwise.

A profile is a pair of int64 [Tq] tensors (visited, full). Closed forms cover Full,
key-only patterns, flattened-index compositions on contiguous tiles (`analysis.flat_form`),
causal and band spans, globals, and a `Window` on box tiles, which factors over
dimensions: a box tile pair is visited (full) iff it is visited (full) along every
dimension, so `window_dim_tiles` scores many box shapes from a few 1-D analyses.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from ..analysis import flat_form, flat_terms, kv_tile_status
from ..analysis.windows import window_dim_pairs
from ..ir import Band, Causal, Full, Global, Pattern, Spec, Window
from ..analysis.plan import Plan
from ..core.semantics import depends_on_kv_only, window_1d
from ..core.tiles import TileGrid
from .tile_shapes import tile_dims

MASK_EXTENT = 1024  # up to this extent `window_dim_tiles` reduces the 1-D mask; beyond, it classifies intervals


@lru_cache(maxsize=4096)
def window_dim_tiles(L: int, w: int, s: int, d: int, causal: bool, tq: int, tk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For q tiles of `tq` and kv tiles of `tk` consecutive coordinates along one dimension
    of extent L: the number of visited and of full kv tiles of each q tile (int64 [Tq]).

    `analysis.windows` classifies given interval pairs; this counts them per q tile, over
    the kv tiles of each q tile's `window_hull`, classified by `analysis.windows.window_dim_pairs`
    (or, up to `MASK_EXTENT`, by reducing the 1-D mask). A box tile pair of an n-D Window
    is visited (full) iff it is along every dimension, so the n-D numbers of a q tile are
    the products over dimensions.
    """
    Tq, Tk = -(-L // tq), -(-L // tk)
    if L <= MASK_EXTENT:
        i = torch.arange(L)
        m = window_1d(i[:, None], i[None, :], L, w, s, d, causal)
        pad_q, pad_k = Tq * tq - L, Tk * tk - L
        any_ = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=False)
        all_ = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=True)
        any_ = any_.view(Tq, tq, Tk, tk).any(3).any(1)
        all_ = all_.view(Tq, tq, Tk, tk).all(3).all(1) & any_
        return any_.sum(1), all_.sum(1)
    rows, _, any_, all_ = window_dim_pairs(L, w, s, d, causal, tq, tk)
    visited = torch.bincount(rows[any_], minlength=Tq)
    full = torch.bincount(rows[any_ & all_], minlength=Tq)
    return visited, full


@lru_cache(maxsize=1 << 14)
def window_dim_sums(L: int, w: int, s: int, d: int, causal: bool, tq: int, tk: int) -> tuple[int, int, int]:
    """(visited, full, max visited per q tile) of a window along one dimension: the totals of
    `window_dim_tiles`, whose products over dimensions are the search's exact n-D totals."""
    v, f = window_dim_tiles(L, w, s, d, causal, tq, tk)
    return int(v.sum()), int(f.sum()), int(v.max())


def _box_dims(grid: TileGrid) -> tuple[int, ...] | None:
    """The tile as a box (one extent per dimension), also for a flat tile that is a box."""
    return tile_dims(grid.tile, grid.shape)


def _window_totals(node: Window, spec: Spec, qdims, kdims):
    """Per-dimension (visited, full) arrays of a window on box tiles."""
    return [window_dim_tiles(L, w, s, d, bool(c), tq, tk)
            for (w, s, d, c), L, tq, tk in zip(node.dims(spec.ndim), spec.q_shape, qdims, kdims)]


def _outer(arrays: Sequence[torch.Tensor]) -> torch.Tensor:
    out = arrays[0]
    for a in arrays[1:]:
        out = (out[:, None] * a[None, :]).flatten()
    return out


def closed_form_profile(pattern: Pattern, spec: Spec, qg: TileGrid, kg: TileGrid):
    """(visited, full) kv tiles of each q tile, int64 [Tq], without a plan; None when the
    pattern needs one (Routed, windows on flat n-D tiles, windows composed with other
    primitives, flattened-index compositions on box tiles)."""
    Tq, Tk = qg.count, kg.count
    if isinstance(pattern, Full):
        return torch.full((Tq,), Tk, dtype=torch.long), torch.full((Tq,), Tk, dtype=torch.long)
    if depends_on_kv_only(pattern):
        kany, kall = kv_tile_status(pattern, kg, spec)
        return torch.full((Tq,), int(kany.sum()), dtype=torch.long), torch.full((Tq,), int((kall & kany).sum()),
                                                                                 dtype=torch.long)
    flat = flat_form(pattern, spec, qg, kg)  # flattened-index compositions on contiguous tiles
    if flat is not None:
        return flat.profile()
    if isinstance(pattern, Window):
        qd, kd = _box_dims(qg), _box_dims(kg)
        if qd is None or kd is None:
            return None
        per = _window_totals(pattern, spec, qd, kd)
        return _outer([v for v, _ in per]), _outer([f for _, f in per])
    if isinstance(pattern, Causal) or (isinstance(pattern, Band) and qg.contiguous and kg.contiguous):
        # Causal needs only each tile's smallest and largest token; a Band's lower edge may fall
        # between the runs of non-contiguous tiles, so it needs contiguous ones
        off = spec.nkv - spec.nq
        left = None if isinstance(pattern, Causal) else pattern.left
        right = 0 if isinstance(pattern, Causal) else pattern.right
        qmin, qmax = qg.span
        kmin, kmax = kg.span
        # visited: kmin <= qmax + off + right and kmax >= qmin + off - left (spans are monotone)
        hi = torch.searchsorted(kmin, qmax + off + right, right=True)
        lo = torch.zeros_like(hi) if left is None else torch.searchsorted(kmax, qmin + off - left)
        visited = (hi - lo).clamp_min(0)
        # full: kmax <= qmin + off + right and kmin >= qmax + off - left
        fhi = torch.searchsorted(kmax, qmin + off + right, right=True)
        flo = torch.zeros_like(fhi) if left is None else torch.searchsorted(kmin, qmax + off - left)
        return visited, (fhi - flo).clamp_min(0)
    if isinstance(pattern, Global):
        qmin, qmax = qg.span
        kmin, kmax = kg.span
        nk_any, nk_all = int((kmin < pattern.n).sum()), int((kmax < pattern.n).sum())
        visited = torch.where(qmin < pattern.n, Tk, nk_any)
        full = torch.where(qmax < pattern.n, Tk, nk_all)
        return visited, full
    return None


def has_closed_form(pattern: Pattern, qg: TileGrid, kg: TileGrid) -> bool:
    """Whether `closed_form_profile` handles the pattern on these grids (without computing it)."""
    if isinstance(pattern, Full) or depends_on_kv_only(pattern) or isinstance(pattern, Global):
        return True
    if isinstance(pattern, Window):
        return _box_dims(qg) is not None and _box_dims(kg) is not None
    if isinstance(pattern, Causal):
        return True
    if isinstance(pattern, Band):
        return qg.contiguous and kg.contiguous
    return flat_terms(pattern) is not None and qg.contiguous and kg.contiguous


def plan_profiles(plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The profile of each of a plan's head groups, read from its CSR."""
    out = []
    for g in plan.groups:
        visited = g.q_ptr.diff()
        rows = g.pairs()[0]
        full = torch.zeros(g.num_q_tiles, dtype=torch.long).index_add_(0, rows, g.full.long())
        out.append((visited, full))
    return out


__all__ = ["window_dim_tiles", "window_dim_sums", "closed_form_profile", "has_closed_form", "plan_profiles"]

"""`Window` along one dimension, on intervals of coordinates.

The visible key range of a query is an interval [lo(x), hi(x)] in dilation-group
coordinates with lo and hi non-decreasing in x, so "is any / every key of [ka, kb]
visible from some / every query of [qa, qb]" is exact with a binary search.
"""
from __future__ import annotations

import torch

from ..core.semantics import group_length, window_bounds
from ..core.statuses import expand_ranges


def _residue_coords(a: torch.Tensor, b: torch.Tensor, r: int, d: int):
    """Group coordinates [ceil((a-r)/d), floor((b-r)/d)] of the members of residue r in [a, b]."""
    return -((r - a) // d), (b - r) // d


def window_hull(qa, qb, L, w, s, d, causal):
    """Smallest and largest key coordinate visible from any query in [qa, qb] (one dimension)."""
    jmin = torch.full_like(qa, L)
    jmax = torch.full_like(qa, -1)
    for r in range(d):
        xa, xb = _residue_coords(qa, qb, r, d)
        ok = xa <= xb
        Lg = torch.tensor(group_length(L, d, r))
        lo, _ = window_bounds(xa.clamp_min(0), Lg, w, s, causal)
        _, hi = window_bounds(xb.clamp_min(0), Lg, w, s, causal)
        jmin = torch.where(ok, torch.minimum(jmin, lo * d + r), jmin)
        jmax = torch.where(ok, torch.maximum(jmax, hi * d + r), jmax)
    return jmin, jmax


def window_interval_status(qa, qb, ka, kb, L, w, s, d, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (any, all) visibility of key interval [ka, kb] from query interval [qa, qb]
    along one dimension of extent L."""
    any_ = torch.zeros(qa.shape, dtype=torch.bool)
    steps = max(1, (L + 1).bit_length())
    for r in range(d):
        xa, xb = _residue_coords(qa, qb, r, d)
        ya, yb = _residue_coords(ka, kb, r, d)
        Lg = torch.tensor(group_length(L, d, r))
        # smallest x in [xa, xb] whose window reaches ya (hi is non-decreasing)
        lo_x, hi_x = xa.clone(), xb + 1
        for _ in range(steps):
            mid = (lo_x + hi_x) // 2
            reach = window_bounds(mid.clamp(0, L), Lg, w, s, causal)[1] >= ya
            go_left = reach & (mid <= xb)
            hi_x = torch.where(go_left, mid, hi_x)
            lo_x = torch.where(go_left, lo_x, mid + 1)
            lo_x = torch.minimum(lo_x, hi_x)
        found = (xa <= xb) & (ya <= yb) & (hi_x <= xb)
        first_lo = window_bounds(hi_x.clamp(0, L), Lg, w, s, causal)[0]
        any_ |= found & (first_lo <= yb)
    if d == 1:
        all_ = undilated_interval_all(qa, qb, ka, kb, L, w, s, causal)
    else:  # an interval of two or more tokens spans two residues, of which only one can match
        all_ = any_ & (qa == qb) & (ka == kb)
    return any_, all_


def undilated_interval_all(qa, qb, ka, kb, L, w, s, causal) -> torch.Tensor:
    """Whether every query in [qa, qb] sees every key in [ka, kb] through an undilated window:
    the visible intervals move monotonically with the query, so the first and the last query
    decide."""
    Lg = torch.tensor(L)
    lo_last, _ = window_bounds(qb, Lg, w, s, causal)
    _, hi_first = window_bounds(qa, Lg, w, s, causal)
    return (lo_last <= ka) & (hi_first >= kb)


def window_dim_pairs(L: int, w: int, s: int, d: int, causal: bool, tq: int, tk: int):
    """Along one dimension of extent L, for q tiles of `tq` and kv tiles of `tk` consecutive
    coordinates: (rows, kt, any_, all_) over the kv tiles of each q tile's `window_hull`
    (rows the q tile, kt the kv tile, row-major) with their exact (any, all) visibility.

    Undilated, the visible keys of consecutive queries overlap or touch (stride <= size, as
    `Window` requires), so every kv tile of the hull is visible and only "all" is computed
    (`undilated_interval_all`); dilated, `window_interval_status` classifies each pair."""
    qa = torch.arange(-(-L // tq)) * tq
    qb = (qa + tq - 1).clamp(max=L - 1)
    jmin, jmax = window_hull(qa, qb, L, w, s, d, causal)
    rows, kt = expand_ranges(jmin // tk, jmax // tk)
    ka = kt * tk
    kb = (ka + tk - 1).clamp(max=L - 1)
    if d == 1:
        return rows, kt, torch.ones(rows.shape, dtype=torch.bool), undilated_interval_all(
            qa[rows], qb[rows], ka, kb, L, w, s, causal)
    any_, all_ = window_interval_status(qa[rows], qb[rows], ka, kb, L, w, s, d, causal)
    return rows, kt, any_, all_


class WindowDim:
    """`Window` along one dimension of extent L, with the interface `BlocksDim` has too
    (hull, status, pairs), so the tile analysis treats both per dimension alike."""

    def __init__(self, L: int, w: int, s: int, d: int, causal: bool):
        self.nq, self.args = L, (L, w, s, d, causal)

    def hull(self, qa, qb):
        return window_hull(qa, qb, *self.args)

    def status(self, qa, qb, ka, kb):
        return window_interval_status(qa, qb, ka, kb, *self.args)

    def pairs(self, tq: int, tk: int):
        return window_dim_pairs(*self.args, tq, tk)

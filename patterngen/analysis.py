"""Tile analysis: classify (q tile, kv tile) pairs as empty, partial or full.

Nothing here materialises the Nq x Nkv mask. Each primitive classifies tile
pairs exactly in closed form on the representation that suits it:

* `Window` factors over dimensions, so a box pair is visible somewhere iff it
  is in every dimension; per dimension the visible key range of a query is an
  interval [lo(x), hi(x)] (in dilation-group coordinates) with lo and hi
  non-decreasing in x, which makes interval-pair questions exact with a
  binary search.
* `Band`/`Causal` act on the flattened index: the key-minus-query differences
  of two runs of consecutive tokens form an interval.
* `Sink`/`Strided`/`Full` depend on the key alone: one scan over the keys.
* `Global` is a threshold on query or key: tile minima and maxima decide.
* `Routed` counts selected blocks under a tile pair with 2-D prefix sums.

Compositions: a union or an intersection of exact children is exact except
where two children are partial on the same tile (a union may then be full,
an intersection empty); only those tiles are refined by evaluating the
element-wise semantics on the tile's tokens. Intersections evaluate their most
selective child first and ask the others only about its tiles.

Flattened-index patterns (Full, Causal, Band, Sink, Global, Strided under any
unions and intersections) on tiles of consecutive tokens skip all of that:
`FlatForm` writes them as a union of terms (a delta interval, a query prefix, a
key-only pattern) and classifies every tile pair in closed form, per q tile and
per run of kv tiles, so a plan costs time in the tile count, never in tokens
(see the section "flattened-index patterns in closed form").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .ir import (Band, Causal, Full, Global, Intersection, Pattern, Routed, Sink, Spec, Strided, Union,
                 Window)
from .semantics import depends_on_kv_only, group_length, visible, window_bounds
from .tiles import TileGrid

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHUNK = 1 << 22  # elements per batch of element-wise refinement


def _status(any_: torch.Tensor, all_: torch.Tensor) -> torch.Tensor:
    return torch.where(all_ & any_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)


def _expand(first: torch.Tensor, last: torch.Tensor, rows: torch.Tensor | None = None):
    """All (row, col) with first[i] <= col <= last[i], in row-major order."""
    cnt = (last - first + 1).clamp_min(0)
    rep = torch.repeat_interleave(torch.arange(len(cnt)), cnt)
    starts = torch.cumsum(cnt, 0) - cnt
    cols = first[rep] + torch.arange(len(rep)) - starts[rep]
    return (rep if rows is None else rows[rep]), cols


# -- Window: one dimension ------------------------------------------------------
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
        Lg = torch.tensor(L)
        lo_last, _ = window_bounds(qb, Lg, w, s, causal)
        _, hi_first = window_bounds(qa, Lg, w, s, causal)
        all_ = (lo_last <= ka) & (hi_first >= kb)
    else:  # an interval of two or more tokens spans two residues, of which only one can match
        all_ = any_ & (qa == qb) & (ka == kb)
    return any_, all_


class TileAnalysis:
    """One analysis instance: a spec, its two tile grids and (for Routed) one block mask."""

    def __init__(self, spec: Spec, qg: TileGrid, kg: TileGrid, block_mask: torch.Tensor | None = None,
                 shared: dict | None = None):
        self.spec, self.qg, self.kg, self.block_mask = spec, qg, kg, block_mask
        self.offset = spec.nkv - spec.nq
        self.memo: dict = {}
        self.shared = self.memo if shared is None else shared  # results of Routed-free nodes

    # -- public entry points ---------------------------------------------------
    def classify(self, node: Pattern):
        """Every non-empty tile pair of `node`: (qt, kt, status) sorted by (qt, kt)."""
        memo = self.memo if has_routed(node) else self.shared
        if node not in memo:
            memo[node] = self._classify(node)
        return memo[node]

    def status_on(self, node: Pattern, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        """Exact status of `node` on the given tile pairs."""
        if isinstance(node, Full):
            return torch.full(qt.shape, FULL, dtype=torch.int8)
        flat = self.flat(node)
        if flat is not None:
            return flat.status(qt, kt)
        if depends_on_kv_only(node):
            kany, kall = self._kv_scan(node)
            return _status(kany[kt], kall[kt])
        if isinstance(node, Window):
            return self._window_status(node, qt, kt)
        if isinstance(node, (Band, Causal)):
            return self._band_status(node, qt, kt)
        if isinstance(node, Global):
            qmin, qmax = self.qg.span
            kmin, kmax = self.kg.span
            return _status((qmin[qt] < node.n) | (kmin[kt] < node.n), (qmax[qt] < node.n) | (kmax[kt] < node.n))
        if isinstance(node, Routed):
            return self._routed_status(node, qt, kt)
        if isinstance(node, (Union, Intersection)):
            return self._combine(node, qt, kt, [self.status_on(p, qt, kt) for p in node.parts])
        raise TypeError(f"analysis: unsupported pattern node {node!r}")

    def flat(self, node: Pattern) -> "FlatForm | None":
        """The closed-form classifier of a flattened-index pattern on contiguous tiles (cached)."""
        key = ("flat", node)
        if key not in self.shared:
            self.shared[key] = None if has_routed(node) else flat_form(node, self.spec, self.qg, self.kg)
        return self.shared[key]

    # -- classification ----------------------------------------------------------
    def _classify(self, node: Pattern):
        Tq, Tk = self.qg.count, self.kg.count
        flat = None if isinstance(node, Full) else self.flat(node)
        if flat is not None:
            return flat.pairs()
        if isinstance(node, Full):
            qt = torch.arange(Tq).repeat_interleave(Tk)
            return qt, torch.arange(Tk).repeat(Tq), torch.full(qt.shape, FULL, dtype=torch.int8)
        if depends_on_kv_only(node):
            kany, kall = self._kv_scan(node)
            cols = torch.nonzero(kany).flatten()
            qt = torch.arange(Tq).repeat_interleave(len(cols))
            kt = cols.repeat(Tq)
            return qt, kt, _status(kany[kt], kall[kt])
        if isinstance(node, Window) and self._box_tiles() is not None:
            return self._window_product(node)
        if isinstance(node, Union):
            parts = [self.classify(p) for p in node.parts]
            key = torch.cat([q * Tk + k for q, k, _ in parts])
            st = torch.cat([s for _, _, s in parts])
            key, inv = torch.unique(key, return_inverse=True)
            full = torch.zeros(len(key), dtype=torch.long).index_add_(0, inv, (st == FULL).long()) > 0
            npart = torch.zeros(len(key), dtype=torch.long).index_add_(0, inv, (st == PARTIAL).long())
            status = torch.where(full, FULL, PARTIAL).to(torch.int8)
            qt, kt = key // Tk, key % Tk
            amb = ~full & (npart > 1)
            if amb.any():
                status[amb] = self._refine(node, qt[amb], kt[amb])
            return qt, kt, status
        if isinstance(node, Intersection):
            pivot = min(node.parts, key=_selectivity_rank)
            qt, kt, st = self.classify(pivot)
            status = self._combine(node, qt, kt, [st if p is pivot else self.status_on(p, qt, kt)
                                                  for p in node.parts])
            keep = status != EMPTY
            return qt[keep], kt[keep], status[keep]
        qt, kt = self._candidates(node)
        status = self.status_on(node, qt, kt)
        keep = status != EMPTY
        return qt[keep], kt[keep], status[keep]

    def _combine(self, node, qt, kt, statuses: list[torch.Tensor]) -> torch.Tensor:
        st = torch.stack(statuses)
        npart = (st == PARTIAL).sum(0)
        if isinstance(node, Union):
            out = torch.where((st == FULL).any(0), FULL, torch.where(npart > 0, PARTIAL, EMPTY))
            amb = (out == PARTIAL) & (npart > 1)
        else:
            out = torch.where((st == EMPTY).any(0), EMPTY, torch.where(npart > 0, PARTIAL, FULL))
            amb = (out == PARTIAL) & (npart > 1)
        out = out.to(torch.int8)
        if amb.any():
            out[amb] = self._refine(node, qt[amb], kt[amb])
        return out

    def _refine(self, node: Pattern, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        """Exact status by evaluating the semantics on every token pair of each tile pair."""
        out = torch.empty(qt.shape, dtype=torch.int8)
        per = max(1, _CHUNK // (self.qg.volume * self.kg.volume))
        for i in range(0, len(qt), per):
            q = self.qg.tokens(qt[i:i + per])[:, :, None]
            k = self.kg.tokens(kt[i:i + per])[:, None, :]
            valid = (q >= 0) & (k >= 0)
            vis = visible(node, q.clamp_min(0), k.clamp_min(0), self.spec, self.block_mask)
            out[i:i + per] = _status((vis & valid).flatten(1).any(1), (vis | ~valid).flatten(1).all(1))
        return out

    # -- candidates of leaves (supersets of the non-empty pairs) -------------------
    def _candidates(self, node):
        Tq, Tk = self.qg.count, self.kg.count
        if isinstance(node, (Band, Causal)):
            qmin, qmax = self.qg.span
            left = None if isinstance(node, Causal) else node.left
            right = 0 if isinstance(node, Causal) else node.right
            lo = torch.zeros_like(qmin) if left is None else (qmin + self.offset - left).clamp_min(0)
            hi = (qmax + self.offset + right).clamp(max=self.spec.nkv - 1)
            return _expand(*self._kv_tile_range(lo, hi))
        if isinstance(node, Global):
            qmin, _ = self.qg.span
            n_sink = int((self.kg.span[0] < node.n).sum())
            last = torch.where(qmin < node.n, Tk - 1, n_sink - 1)
            return _expand(torch.zeros(Tq, dtype=torch.long), last)
        if isinstance(node, Window):  # flat tiles on an n-D grid: bounding boxes, then flat ranges
            return self._window_candidates(node)
        if isinstance(node, Routed):
            return torch.arange(Tq).repeat_interleave(Tk), torch.arange(Tk).repeat(Tq)
        raise TypeError(f"analysis: unsupported pattern node {node!r}")

    def _kv_tile_range(self, lo: torch.Tensor, hi: torch.Tensor):
        """First and last kv tile whose flattened span meets [lo, hi] (tile spans are monotone)."""
        kmin, kmax = self.kg.span
        first = torch.searchsorted(kmax, lo)
        last = torch.searchsorted(kmin, hi, right=True) - 1
        return first, torch.where(hi >= lo, last, first - 1)

    # -- Window ------------------------------------------------------------------
    def _box_tiles(self):
        """Per-dimension (q tile, kv tile) extents when both tilings are boxes (1-D counts)."""
        qg, kg = self.qg, self.kg
        if len(qg.shape) == 1:
            return ((qg.tile,), (kg.tile,))
        if qg.flat or kg.flat:
            return None
        return qg.tile, kg.tile

    def _window_product(self, node: Window):
        """Per-dimension tile lists, combined as a Cartesian product (sorted by q, then kv)."""
        (qtile, ktile), spec = self._box_tiles(), self.spec
        qcounts, kcounts = self.qg.counts, self.kg.counts
        per_dim = []
        for (w, s, d, c), L, tq, tk in zip(node.dims(spec.ndim), spec.q_shape, qtile, ktile):
            qa = torch.arange(-(-L // tq)) * tq
            qb = (qa + tq - 1).clamp(max=L - 1)
            jmin, jmax = window_hull(qa, qb, L, w, s, d, c)
            rows, kt = _expand(jmin // tk, jmax // tk)
            ka = kt * tk
            any_, all_ = window_interval_status(qa[rows], qb[rows], ka, (ka + tk - 1).clamp(max=L - 1), L, w, s, d, c)
            rows, kt, full = rows[any_], kt[any_], all_[any_]
            ptr = torch.zeros(len(qa) + 1, dtype=torch.long)
            ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=len(qa)), 0)
            per_dim.append((ptr, kt, full))
        Tq = self.qg.count
        cur_q = torch.arange(Tq)
        cur_k = torch.zeros(Tq, dtype=torch.long)
        cur_full = torch.ones(Tq, dtype=torch.bool)
        for k, (ptr, kt, full) in enumerate(per_dim):
            a = (cur_q // math.prod(qcounts[k + 1:])) % qcounts[k]
            first, cnt = ptr[a], ptr[a + 1] - ptr[a]
            rep, idx = _expand(first, first + cnt - 1)
            cur_q, cur_full = cur_q[rep], cur_full[rep] & full[idx]
            cur_k = cur_k[rep] * kcounts[k] + kt[idx]
        return cur_q, cur_k, torch.where(cur_full, FULL, PARTIAL).to(torch.int8)

    def _window_candidates(self, node: Window):
        spec = self.spec
        qlo, qhi = self.qg.bbox
        region_lo, region_hi = [], []
        for k, ((w, s, d, c), L) in enumerate(zip(node.dims(spec.ndim), spec.q_shape)):
            jmin, jmax = window_hull(qlo[:, k], qhi[:, k], L, w, s, d, c)
            region_lo.append(jmin)
            region_hi.append(jmax)
        rlo, rhi = torch.stack(region_lo, 1), torch.stack(region_hi, 1)
        strides = torch.tensor(self.kg.strides)
        qt, kt = _expand(*self._kv_tile_range((rlo * strides).sum(1), (rhi * strides).sum(1)))
        klo, khi = self.kg.bbox
        meets = ((klo[kt] <= rhi[qt]) & (khi[kt] >= rlo[qt])).all(1)
        return qt[meets], kt[meets]

    def _window_status(self, node: Window, qt, kt):
        """Exact status via every (q box, kv box) pair of each tile pair."""
        spec = self.spec
        qlo, qhi, qv = self.qg.boxes
        klo, khi, kv = self.kg.boxes
        out = torch.empty(qt.shape, dtype=torch.int8)
        per = max(1, _CHUNK // (qlo.shape[1] * klo.shape[1] * 64))
        for i in range(0, len(qt), per):
            q, k = qt[i:i + per], kt[i:i + per]
            any_bb = all_bb = None
            for dim, ((w, s, d, c), L) in enumerate(zip(node.dims(spec.ndim), spec.q_shape)):
                shape = (len(q), qlo.shape[1], klo.shape[1])
                a, al = window_interval_status(
                    qlo[q][:, :, None, dim].expand(shape), qhi[q][:, :, None, dim].expand(shape),
                    klo[k][:, None, :, dim].expand(shape), khi[k][:, None, :, dim].expand(shape), L, w, s, d, c)
                any_bb = a if any_bb is None else any_bb & a
                all_bb = al if all_bb is None else all_bb & al
            valid = qv[q][:, :, None] & kv[k][:, None, :]
            out[i:i + per] = _status((any_bb & valid).flatten(1).any(1), (all_bb | ~valid).flatten(1).all(1))
        return out

    # -- flattened-index primitives -------------------------------------------------
    def _band_status(self, node, qt, kt):
        left = None if isinstance(node, Causal) else node.left
        right = 0 if isinstance(node, Causal) else node.right
        qmin, qmax = self.qg.span
        kmin, kmax = self.kg.span
        dmin = kmin[kt] - qmax[qt] - self.offset
        dmax = kmax[kt] - qmin[qt] - self.offset
        all_ = dmax <= right if left is None else (dmin >= -left) & (dmax <= right)
        any_ = dmin <= right if left is None else (dmin <= right) & (dmax >= -left)
        if left is not None and not (self.qg.contiguous and self.kg.contiguous):
            amb = any_ & ~all_
            if amb.any():  # differences of non-contiguous tiles may skip the band: check run pairs
                s_q, e_q, v_q = (x[qt[amb]] for x in self.qg.runs)
                s_k, e_k, v_k = (x[kt[amb]] for x in self.kg.runs)
                lo = s_k[:, None, :] - e_q[:, :, None] - self.offset
                hi = e_k[:, None, :] - s_q[:, :, None] - self.offset
                hit = (lo <= right) & (hi >= -left) & v_q[:, :, None] & v_k[:, None, :]
                any_[amb] = hit.flatten(1).any(1)
        return _status(any_, all_)

    def _kv_scan(self, node):
        """Per kv tile: does any / every key satisfy a key-only pattern?"""
        key = ("kv-scan", node)
        if key not in self.shared:
            self.shared[key] = kv_tile_status(node, self.kg, self.spec)
        return self.shared[key]

    def _routed_status(self, node: Routed, qt, kt):
        if not (self.qg.contiguous and self.kg.contiguous):
            raise ValueError(f"tiling: {node!r} selects blocks of consecutive tokens, so it needs flat "
                             f"(int) q and kv tiles, got {self.qg.tile!r} and {self.kg.tile!r}")
        if self.block_mask is None:
            raise ValueError("block_indices: the pattern contains Routed blocks, so block indices are needed "
                             "(see patterngen.route)")
        B = node.block
        csum = torch.zeros(self.block_mask.shape[0] + 1, self.block_mask.shape[1] + 1, dtype=torch.long)
        csum[1:, 1:] = self.block_mask.long().cumsum(0).cumsum(1)
        qmin, qmax = self.qg.span
        kmin, kmax = self.kg.span
        a0, a1 = qmin[qt] // B, qmax[qt] // B + 1
        b0, b1 = kmin[kt] // B, kmax[kt] // B + 1
        hits = csum[a1, b1] - csum[a0, b1] - csum[a1, b0] + csum[a0, b0]
        st = _status(hits > 0, hits == (a1 - a0) * (b1 - b0))
        if node.causal:
            st = self._combine(Intersection((node, Causal())), qt, kt, [st, self._band_status(Causal(), qt, kt)])
        return st


def has_routed(node: Pattern) -> bool:
    return any(isinstance(n, Routed) for n in node.walk())


def _selectivity_rank(node: Pattern) -> int:
    """Lower is more selective: the child an intersection classifies first."""
    if isinstance(node, (Window, Band, Routed)):
        return 0
    if isinstance(node, Sink):
        return 1
    if isinstance(node, Global):
        return 2
    if isinstance(node, Causal):
        return 3
    if isinstance(node, Strided):
        return 4
    if isinstance(node, Union):
        return max(_selectivity_rank(p) for p in node.parts)
    if isinstance(node, Intersection):
        return min(_selectivity_rank(p) for p in node.parts)
    return 5


# -- flattened-index patterns in closed form ------------------------------------------
_KV_TABLE = 1 << 22     # residue-table entries (segments x period) of one key-only pattern
_MAX_TERMS = 16         # union terms of a flattened-index pattern before the tree analysis takes over
_ROWS = 1 << 15         # q tiles per batch of the closed-form plan and profile
_PAIRS = 1 << 18        # tile pairs per batch of exact statuses


def _kv_parts(pattern: Pattern) -> tuple[int, list[int]]:
    """Period (lcm of the strides) and sorted Sink thresholds of a key-only pattern."""
    period, sinks = 1, set()
    for n in pattern.walk():
        if isinstance(n, Strided):
            period = math.lcm(period, n.stride)
        elif isinstance(n, Sink):
            sinks.add(n.n)
    return period, sorted(sinks)


def kv_count_ok(pattern: Pattern) -> bool:
    """Whether `KvCount` can tabulate this key-only pattern within `_KV_TABLE` entries."""
    period, sinks = _kv_parts(pattern)
    return period * (len(sinks) + 1) <= _KV_TABLE


def _kv_eval(node: Pattern, r: torch.Tensor, end: int | None) -> torch.Tensor:
    """A key-only pattern on keys of residue r (modulo its period) inside a segment that
    ends before `end` (None: unbounded) and holds no Sink threshold, so Sinks are constant."""
    if isinstance(node, Full):
        return torch.ones(r.shape, dtype=torch.bool)
    if isinstance(node, Sink):
        return torch.full(r.shape, end is not None and node.n >= end, dtype=torch.bool)
    if isinstance(node, Strided):
        return r % node.stride == node.offset
    if isinstance(node, (Union, Intersection)):
        parts = [_kv_eval(p, r, end) for p in node.parts]
        out = parts[0]
        for m in parts[1:]:
            out = (out | m) if isinstance(node, Union) else (out & m)
        return out
    raise TypeError(f"not a key-only pattern: {node!r}")


class KvCount:
    """Visible keys of a key-only pattern in any key interval, without touching keys.

    Between consecutive Sink thresholds the pattern is periodic in the lcm P of its
    strides, so one table of prefix counts per segment and residue answers every
    interval: prefix(x) = (visible keys below the segment) + whole periods + table.
    """

    def __init__(self, pattern: Pattern):
        P, sinks = _kv_parts(pattern)
        starts = [0] + [n for n in sinks if n > 0]
        r = torch.arange(P)
        self.P = P
        self.starts = torch.tensor(starts)
        self.table = torch.zeros(len(starts), P + 1, dtype=torch.long)
        for s in range(len(starts)):
            end = starts[s + 1] if s + 1 < len(starts) else None
            self.table[s, 1:] = torch.cumsum(_kv_eval(pattern, r, end).long(), 0)
        tab = self.table.tolist()

        def F(s: int, y: int) -> int:  # visible keys in [0, y) if segment s covered all keys
            return (y // P) * tab[s][P] + tab[s][y % P]

        below, shift = 0, []
        for s, a in enumerate(starts):
            if s:
                below += F(s - 1, a) - F(s - 1, starts[s - 1])
            shift.append(below - F(s, a))
        self.shift = torch.tensor(shift)
        # without strides the pattern is Sinks (and Full) under | and &, so its keys are a prefix:
        # the keys below `prefix_end` (None: every key)
        self.prefix = self._periodic_prefix
        if P == 1:
            vis = [tab[s][1] for s in range(len(starts))]
            k = vis.index(0) if 0 in vis else len(vis)
            if not any(vis[k:]):
                self.prefix_end = starts[k] if k < len(starts) else None
                self.prefix = self._prefix_of_prefix

    def _prefix_of_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.prefix_end is None else torch.clamp(x, max=self.prefix_end)

    def _periodic_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Visible keys in [0, x) for x >= 0."""
        s = torch.searchsorted(self.starts, x, right=True) - 1
        return self.shift[s] + (x // self.P) * self.table[s, self.P] + self.table[s, x % self.P]

    def count(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Visible keys in [a, b] (0 where b < a)."""
        a = a.clamp_min(0)
        b1 = torch.maximum(b + 1, a)
        return self.prefix(b1) - self.prefix(a)


def kv_tile_status(node: Pattern, kg: TileGrid, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kv tile: does any / every key satisfy the key-only `node`? Counted over each
    tile's runs of consecutive keys when the pattern tabulates, else scanned in chunks."""
    if kv_count_ok(node):
        kc = KvCount(node)
        start, end, valid = kg.runs
        c = torch.where(valid, kc.count(start, end), 0).sum(1)
        return c > 0, c == kg.sizes
    any_ = torch.empty(kg.count, dtype=torch.bool)
    all_ = torch.empty(kg.count, dtype=torch.bool)
    per = max(1, _CHUNK // kg.volume)
    for i in range(0, kg.count, per):
        tok = kg.tokens(torch.arange(i, min(kg.count, i + per)))
        valid = tok >= 0
        vis = visible(node, torch.zeros((), dtype=torch.long), tok.clamp_min(0), spec)
        any_[i:i + per], all_[i:i + per] = (vis & valid).any(1), (vis | ~valid).all(1)
    return any_, all_


@dataclass(frozen=True)
class Term:
    """One term of a flattened-index pattern: lo <= kv - q - (Nkv - Nq) <= hi, q < qn and the
    key-only pattern `kv`; None leaves that side unbounded (kv None: every key). Every
    delta interval holds 0 (Band and Causal do), so a union of two of them is an interval."""

    lo: int | None = None
    hi: int | None = None
    qn: int | None = None
    kv: Pattern | None = None


def _lower(a, b, unbounded_wins: bool):
    if a is None or b is None:
        return None if unbounded_wins else (b if a is None else a)
    return min(a, b)


def _upper(a, b, unbounded_wins: bool):
    if a is None or b is None:
        return None if unbounded_wins else (b if a is None else a)
    return max(a, b)


def _within(t: Term, u: Term) -> bool:
    """Whether every pair of term t is in term u."""
    return ((u.lo is None or (t.lo is not None and u.lo <= t.lo))
            and (u.hi is None or (t.hi is not None and t.hi <= u.hi))
            and (u.qn is None or (t.qn is not None and t.qn <= u.qn))
            and (u.kv is None or u.kv == t.kv))


def _merge(t: Term, u: Term) -> Term | None:
    """t | u as one term, where that is exact."""
    if _within(t, u):
        return u
    if _within(u, t):
        return t
    if t.qn == u.qn and t.kv == u.kv:  # intervals that both hold 0 unite into one
        return Term(_lower(t.lo, u.lo, True), _upper(t.hi, u.hi, True), t.qn, t.kv)
    if (t.lo, t.hi, t.qn) == (u.lo, u.hi, u.qn):  # (query prefixes are nested: _within took them)
        return Term(t.lo, t.hi, t.qn, None if t.kv is None or u.kv is None else Union.of(t.kv, u.kv))
    return None


def _simplify(terms: list[Term]) -> list[Term]:
    out: list[Term] = []
    for t in terms:
        while True:
            for j, u in enumerate(out):
                m = _merge(t, u)
                if m is not None:
                    del out[j]
                    t = m
                    break
            else:
                break
        out.append(t)
    return out


def _meet(t: Term, u: Term) -> Term:
    kv = t.kv if u.kv is None else u.kv if t.kv is None else Intersection.of(t.kv, u.kv)
    return Term(_upper(t.lo, u.lo, False), _lower(t.hi, u.hi, False), _lower(t.qn, u.qn, False), kv)


@lru_cache(maxsize=1024)
def flat_terms(node: Pattern) -> tuple[Term, ...] | None:
    """`node` as a union of terms (a disjunctive normal form), or None if it holds another
    primitive, more than `_MAX_TERMS` terms or a key-only part too large to tabulate."""
    terms = _terms(node)
    if terms is None or any(t.kv is not None and not kv_count_ok(t.kv) for t in terms):
        return None
    return tuple(terms)


def _terms(node: Pattern) -> list[Term] | None:
    if depends_on_kv_only(node):
        return [Term(kv=None if isinstance(node, Full) else node)]
    if isinstance(node, Causal):
        return [Term(hi=0)]
    if isinstance(node, Band):
        return [Term(-node.left, node.right)]
    if isinstance(node, Global):
        return [Term(kv=Sink(node.n)), Term(qn=node.n)]
    if not isinstance(node, (Union, Intersection)):
        return None
    parts = [_terms(p) for p in node.parts]
    if any(p is None for p in parts):
        return None
    terms = parts[0]
    for p in parts[1:]:
        terms = _simplify(terms + p if isinstance(node, Union) else [_meet(t, u) for t in terms for u in p])
        if len(terms) > _MAX_TERMS:
            return None
    return terms


def flat_form(node: Pattern, spec: Spec, qg: TileGrid, kg: TileGrid) -> "FlatForm | None":
    """The closed-form classifier of `node` on these grids, or None where it does not apply
    (other primitives, or tiles that are not runs of consecutive tokens)."""
    terms = flat_terms(node)
    if terms is None or not (qg.contiguous and kg.contiguous):
        return None
    return FlatForm(terms, spec, qg, kg)


class FlatForm:
    """Exact tile classification of a union of `Term`s on tiles of consecutive tokens.

    For a q tile [qa, qb] and a kv tile [ka, kb]:

    * a term is visible somewhere iff its key-only part has a key in
      [qa + off + lo, qb' + off + hi] within [ka, kb] (qb' = min(qb, qn - 1)): the keys
      that consecutive queries see through one delta interval form one interval;
    * the union is full iff, on each stretch of queries [sa, sb] where every query
      prefix is constant, every key j of the tile has a live term with j >= sb + off + lo
      and one with j <= sa + off + hi (for one key, the live terms' delta intervals all
      hold 0 and so unite into one interval). Both counts are key-only counts in at
      most one interval per term (`KvCount`), never per token.

    Along a q tile's row the kv tiles split at each term's first/last visible and
    first/last full tile into runs; in a run where no delta interval is partial the
    status of a kv tile is that of a key-only union, read from per-kv-tile prefix
    sums, so only the few tiles at band edges (and rows that a query prefix cuts) are
    evaluated one by one.
    """

    def __init__(self, terms: tuple[Term, ...], spec: Spec, qg: TileGrid, kg: TileGrid):
        self.terms = terms
        self.off = spec.nkv - spec.nq
        big = spec.nq + spec.nkv + 1  # beyond every delta and token index
        self.big = big
        self.lo = [-big if t.lo is None else t.lo for t in terms]
        self.hi = [big if t.hi is None else t.hi for t in terms]
        self.qmin, self.qmax = qg.span
        self.kmin, self.kmax = kg.span
        self.Tq, self.Tk = qg.count, kg.count
        self.kv_tile, self.nkv = (kg.tile if kg.flat else None), spec.nkv
        cuts = sorted({t.qn for t in terms if t.qn is not None})
        self.segments = list(zip([0] + cuts, [c - 1 for c in cuts] + [big]))
        self._counts: dict = {}
        self._tables: dict = {}

    # -- key-only counts ---------------------------------------------------------
    def _union_kv(self, idx) -> Pattern | None:
        kvs = [self.terms[i].kv for i in idx]
        return None if any(k is None for k in kvs) else Union.of(*kvs)

    def _count(self, kv: Pattern | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if kv is None:
            return (b - a + 1).clamp_min(0)
        if kv not in self._counts:
            self._counts[kv] = KvCount(kv)
        return self._counts[kv].count(a, b)

    def _table(self, mask: int):
        """Per kv tile, for the union of the key-only parts of the terms in `mask`: prefix
        sums of visible and full tiles, the full flags and the visible tiles' ids."""
        if mask not in self._tables:
            kv = self._union_kv([i for i in range(len(self.terms)) if mask >> i & 1])
            size = self.kmax - self.kmin + 1
            c = self._count(kv, self.kmin, self.kmax)
            any_, full = c > 0, c == size
            cum_any = torch.zeros(self.Tk + 1, dtype=torch.long)
            cum_full = torch.zeros(self.Tk + 1, dtype=torch.long)
            cum_any[1:], cum_full[1:] = torch.cumsum(any_, 0), torch.cumsum(full, 0)
            self._tables[mask] = (cum_any, cum_full, full, torch.nonzero(any_).flatten())
        return self._tables[mask]

    def _sources(self, masks: tuple[int, ...]):
        """Every kv tile (for edge runs), then each mask's visible kv tiles, concatenated, with
        their full flags and the offset of each mask's part (cached: batches repeat masks)."""
        key = ("sources", masks)
        if key not in self._tables:
            tabs = [self._table(m) for m in masks]
            kts = torch.cat([torch.arange(self.Tk)] + [t[3] for t in tabs])
            fulls = torch.cat([torch.zeros(self.Tk, dtype=torch.bool)] + [t[2][t[3]] for t in tabs])
            bases = torch.tensor([0] + [len(t[3]) for t in tabs]).cumsum(0)[:-1] + self.Tk
            self._tables[key] = (kts, fulls, bases.tolist())
        return self._tables[key]

    # -- exact status of given pairs ---------------------------------------------------
    def status(self, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        """EMPTY / PARTIAL / FULL of each (q tile, kv tile) pair, in batches of `_PAIRS`."""
        out = torch.empty(qt.shape, dtype=torch.int8)
        for i in range(0, len(qt), _PAIRS):
            out[i:i + _PAIRS] = self._status(qt[i:i + _PAIRS], kt[i:i + _PAIRS])
        return out

    def _status(self, qt, kt):
        qa, qb, ka, kb = self.qmin[qt], self.qmax[qt], self.kmin[kt], self.kmax[kt]
        off = self.off
        any_ = torch.zeros(qt.shape, dtype=torch.bool)
        for t, lo, hi in zip(self.terms, self.lo, self.hi):
            hq = qb if t.qn is None else torch.clamp(qb, max=t.qn - 1)
            a, b = torch.maximum(ka, qa + off + lo), torch.minimum(kb, hq + off + hi)
            hit = (qa <= hq) & (a <= b)
            if t.kv is not None:
                hit &= self._count(t.kv, a, b) > 0
            any_ |= hit
        full = any_.clone()
        for s0, s1 in self.segments:
            sa, sb = torch.clamp(qa, min=s0), torch.clamp(qb, max=s1)
            here = sa <= sb
            if not bool(here.any()):
                continue
            live = [i for i, t in enumerate(self.terms) if t.qn is None or t.qn > s1]
            covered = self._covered(live, sa, sb, ka, kb) if live else torch.zeros_like(here)
            full &= ~here | covered
        return torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)

    def _covered(self, live: list[int], sa, sb, ka, kb) -> torch.Tensor:
        """Whether every query in [sa, sb] sees every key in [ka, kb] through the live terms."""
        off, size = self.off, kb - ka + 1
        ok = torch.ones(sa.shape, dtype=torch.bool)
        # from below: key j is safe once j >= sb + off + lo of a term holding j; terms by lo
        order = sorted(live, key=lambda i: self.lo[i])
        got = torch.zeros_like(size)
        for k, i in enumerate(order):
            a = torch.maximum(ka, sb + off + self.lo[i])
            b = kb if k + 1 == len(order) else torch.minimum(kb, sb + off + self.lo[order[k + 1]] - 1)
            got += self._count(self._union_kv(order[:k + 1]), a, b)
        ok &= got == size
        # from above: j <= sa + off + hi of a term holding j; terms by hi, widest first
        order = sorted(live, key=lambda i: -self.hi[i])
        got = torch.zeros_like(size)
        for k, i in enumerate(order):
            b = torch.minimum(kb, sa + off + self.hi[i])
            a = ka if k + 1 == len(order) else torch.maximum(ka, sa + off + self.hi[order[k + 1]] + 1)
            got += self._count(self._union_kv(order[:k + 1]), a, b)
        return ok & (got == size)

    def _tiles_before(self, x: torch.Tensor, edge: torch.Tensor, right: bool) -> torch.Tensor:
        """Number of kv tiles whose first (edge = kmin) or last (kmax) token is < x (<= x if
        `right`): a searchsorted, done with a division on flat tiles."""
        t = self.kv_tile
        if t is None:
            return torch.searchsorted(edge, x, right=right)
        x = x + 1 if right else x
        # flat tiles: kmin = k t, kmax = min(k t + t - 1, n - 1)
        if edge is self.kmin:
            n = -torch.div(-x, t, rounding_mode="floor")
        else:
            n = torch.where(x > self.nkv - 1, self.Tk, torch.div(x, t, rounding_mode="floor"))
        return n.clamp(0, self.Tk)

    # -- runs of kv tiles along each q tile's row ---------------------------------------
    def _runs(self, q0: int, q1: int):
        """(q tile, first kv tile, end kv tile, edge, term mask) of every run of the rows
        [q0, q1), in row-major order. In a run that is not an edge every term's delta
        interval is empty or full on each tile, and the terms in `mask` are the full ones."""
        qs = torch.arange(q0, q1)
        qa, qb = self.qmin[qs], self.qmax[qs]
        off, Tk = self.off, self.Tk
        row_edge = torch.zeros(len(qs), dtype=torch.bool)
        cols, bounds = [], []
        for t, lo, hi in zip(self.terms, self.lo, self.hi):
            qempty = torch.zeros_like(row_edge) if t.qn is None else qa >= t.qn
            if t.qn is not None:
                row_edge |= ~qempty & (qb >= t.qn)  # the prefix cuts this q tile: evaluate its row
            a0 = self._tiles_before(qa + off + lo, self.kmax, False)
            a1 = self._tiles_before(qb + off + hi, self.kmin, True)
            f0 = self._tiles_before(qb + off + lo, self.kmin, False)
            f1 = self._tiles_before(qa + off + hi, self.kmax, True)
            act = ~qempty & (a1 > a0)
            a0, a1 = torch.where(act, a0, 0), torch.where(act, a1, 0)
            has_full = act & (f1 > f0)
            f0, f1 = torch.where(has_full, f0, a0), torch.where(has_full, f1, a0)
            bounds.append((a0, f0, f1, a1))
            cols += [a0, f0, f1, a1]
        n = len(qs)
        pts = torch.stack([torch.zeros(n, dtype=torch.long), torch.full((n,), Tk)] + cols, 1)
        pts[:, 2:] = torch.where(row_edge[:, None], 0, pts[:, 2:])
        pts = pts.sort(1).values
        r0, r1 = pts[:, :-1], pts[:, 1:]
        mask = torch.zeros_like(r0)
        partial = torch.zeros(r0.shape, dtype=torch.bool)
        for i, (a0, f0, f1, a1) in enumerate(bounds):
            in_full = (r0 >= f0[:, None]) & (r0 < f1[:, None])
            partial |= (r0 >= a0[:, None]) & (r0 < a1[:, None]) & ~in_full
            mask |= in_full.long() << i
        edge = partial | row_edge[:, None]
        keep = (r1 > r0) & (edge | (mask != 0))
        rows = qs[:, None].expand_as(r0)
        return rows[keep], r0[keep], r1[keep], edge[keep], mask[keep]

    def _row_batches(self):
        """`_runs` over q tiles in batches, so that temporaries stay bounded whatever Tq."""
        per = max(1, _ROWS * 8 // (4 * len(self.terms) + 4))
        for q0 in range(0, self.Tq, per):
            yield self._runs(q0, min(self.Tq, q0 + per))

    # -- consumers -------------------------------------------------------------------------
    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every non-empty tile pair (q tile, kv tile, status), sorted by (q tile, kv tile)."""
        out_q, out_k, out_s = [], [], []
        for rows, r0, r1, edge, mask in self._row_batches():
            # an edge run lists its kv tiles; a uniform run the visible tiles of its key-only union,
            # as positions [cum_any[r0], cum_any[r1]) of that union's visible-tile list
            masks = tuple(torch.unique(mask[~edge]).tolist())
            kts, fulls, bases = self._sources(masks)
            start, count = r0.clone(), r1 - r0
            for m, base in zip(masks, bases):
                cum_any = self._table(m)[0]
                sel = ~edge & (mask == m)
                start[sel] = base + cum_any[r0[sel]]
                count[sel] = cum_any[r1[sel]] - cum_any[r0[sel]]
            rep = torch.repeat_interleave(torch.arange(len(rows)), count)
            idx = start[rep] + torch.arange(len(rep)) - (torch.cumsum(count, 0) - count)[rep]
            kt, qt = kts[idx], rows[rep]
            st = torch.where(fulls[idx], FULL, PARTIAL).to(torch.int8)
            e = edge[rep]
            st[e] = self.status(qt[e], kt[e])
            keep = st != EMPTY
            out_q.append(qt[keep])
            out_k.append(kt[keep])
            out_s.append(st[keep])
        return torch.cat(out_q), torch.cat(out_k), torch.cat(out_s)

    def profile(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visited, full) kv tiles of every q tile, int64 [Tq], without listing the pairs."""
        visited = torch.zeros(self.Tq, dtype=torch.long)
        full = torch.zeros(self.Tq, dtype=torch.long)
        for rows, r0, r1, edge, mask in self._row_batches():
            u = ~edge
            for m in torch.unique(mask[u]).tolist():
                cum_any, cum_full, _, _ = self._table(m)
                sel = u & (mask == m)
                a, b, r = r0[sel], r1[sel], rows[sel]
                visited.index_add_(0, r, cum_any[b] - cum_any[a])
                full.index_add_(0, r, cum_full[b] - cum_full[a])
            qt, kt = _expand(r0[edge], r1[edge] - 1, rows[edge])
            st = self.status(qt, kt)
            visited.index_add_(0, qt, (st != EMPTY).long())
            full.index_add_(0, qt, (st == FULL).long())
        return visited, full

"""Classify every (q tile, kv tile) pair of a pattern as empty, partial or full.

Each primitive is classified exactly in closed form on the representation that suits
it (windows per dimension, flattened-index patterns by `FlatForm`, key-only patterns by
counts, Global by tile extremes, Routed by prefix sums of the block mask). A union or
an intersection of exact children is exact except where two children are partial on
the same tile (a union may then be full, an intersection empty); only those tiles are
refined on their tokens. Intersections classify their most selective child first and
ask the others only about its tiles.
"""
from __future__ import annotations

import math

import torch

from ..core.semantics import depends_on_kv_only
from ..core.tile_eval import tile_statuses
from ..core.tiles import TileGrid
from ..ir import Band, Blocks, Causal, Full, Global, Intersection, Pattern, Routed, Sink, Spec, Strided, Union, Window
from .flat_index import FlatForm, flat_form
from .key_only import kv_tile_status
from ..core.statuses import EMPTY, FULL, PARTIAL, expand_ranges, status_of
from .blocks import BlocksDim
from .windows import WindowDim

_CHUNK = 1 << 22  # box pairs x 64 per batch of the window-status evaluation

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
            return status_of(kany[kt], kall[kt])
        if isinstance(node, (Window, Blocks)):
            return self._grid_status(node, qt, kt)
        if isinstance(node, (Band, Causal)):
            return self._band_status(node, qt, kt)
        if isinstance(node, Global):
            qmin, qmax = self.qg.span
            kmin, kmax = self.kg.span
            return status_of((qmin[qt] < node.n) | (kmin[kt] < node.n), (qmax[qt] < node.n) | (kmax[kt] < node.n))
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
            return qt, kt, status_of(kany[kt], kall[kt])
        if isinstance(node, (Window, Blocks)) and self._box_tiles() is not None \
                and not (self._flat_blocks(node) and not self.kg.flat):  # 1-D blocks against key boxes
            return self._grid_product(node)
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
        else:
            out = torch.where((st == EMPTY).any(0), EMPTY, torch.where(npart > 0, PARTIAL, FULL))
        amb = (out == PARTIAL) & (npart > 1)
        out = out.to(torch.int8)
        if amb.any():
            out[amb] = self._refine(node, qt[amb], kt[amb])
        return out

    def _refine(self, node: Pattern, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        """Exact status by evaluating the semantics on every token pair of each tile pair."""
        return tile_statuses(node, self.spec, self.qg, self.kg, qt, kt, self.block_mask)

    # -- candidates of leaves (supersets of the non-empty pairs) -------------------
    def _candidates(self, node):
        Tq, Tk = self.qg.count, self.kg.count
        if isinstance(node, (Band, Causal)):
            qmin, qmax = self.qg.span
            left = None if isinstance(node, Causal) else node.left
            right = 0 if isinstance(node, Causal) else node.right
            lo = torch.zeros_like(qmin) if left is None else (qmin + self.offset - left).clamp_min(0)
            hi = (qmax + self.offset + right).clamp(max=self.spec.nkv - 1)
            return expand_ranges(*self._kv_tile_range(lo, hi))
        if isinstance(node, Global):
            qmin, _ = self.qg.span
            n_sink = int((self.kg.span[0] < node.n).sum())
            last = torch.where(qmin < node.n, Tk - 1, n_sink - 1)
            return expand_ranges(torch.zeros(Tq, dtype=torch.long), last)
        if isinstance(node, (Window, Blocks)):  # flat tiles on an n-D grid: bounding boxes, then flat ranges
            return self._grid_candidates(node)
        if isinstance(node, Routed):
            return torch.arange(Tq).repeat_interleave(Tk), torch.arange(Tk).repeat(Tq)
        raise TypeError(f"analysis: unsupported pattern node {node!r}")

    def _kv_tile_range(self, lo: torch.Tensor, hi: torch.Tensor):
        """First and last kv tile whose flattened span meets [lo, hi] (tile spans are monotone)."""
        kmin, kmax = self.kg.span
        first = torch.searchsorted(kmax, lo)
        last = torch.searchsorted(kmin, hi, right=True) - 1
        return first, torch.where(hi >= lo, last, first - 1)

    # -- Window and Blocks: per-dimension rules (`WindowDim`, `BlocksDim`) -----------
    def _dim_rules(self, node: Window | Blocks) -> list:
        """One rule per dimension: hull, interval status and per-dimension tile pairs."""
        spec = self.spec
        if isinstance(node, Window):
            return [WindowDim(L, *dims) for dims, L in zip(node.dims(spec.ndim), spec.q_shape)]
        if spec.ndim == 1:  # flattened tokens, queries aligned bottom-right to the keys
            return [BlocksDim(spec.nq, spec.nkv, *node.dims(1)[0], off=self.offset)]
        return [BlocksDim(L, L, size, shift) for (size, shift), L in zip(node.dims(spec.ndim), spec.q_shape)]

    def _box_tiles(self):
        """Per-dimension (q tile, kv tile) extents when both tilings are boxes (1-D counts)."""
        qg, kg = self.qg, self.kg
        if len(qg.shape) == 1:
            return ((qg.tile,), (kg.tile,))
        if qg.flat or kg.flat:
            return None
        return qg.tile, kg.tile

    def _grid_product(self, node: Window | Blocks):
        """Per-dimension tile lists, combined as a Cartesian product (sorted by q, then kv)."""
        qtile, ktile = self._box_tiles()
        qcounts, kcounts = self.qg.counts, self.kg.counts
        per_dim = []
        for rule, tq, tk in zip(self._dim_rules(node), qtile, ktile):
            rows, kt, any_, all_ = rule.pairs(tq, tk)
            rows, kt, full = rows[any_], kt[any_], all_[any_]
            nq = -(-rule.nq // tq)
            ptr = torch.zeros(nq + 1, dtype=torch.long)
            ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=nq), 0)
            per_dim.append((ptr, kt, full))
        Tq = self.qg.count
        cur_q = torch.arange(Tq)
        cur_k = torch.zeros(Tq, dtype=torch.long)
        cur_full = torch.ones(Tq, dtype=torch.bool)
        for k, (ptr, kt, full) in enumerate(per_dim):
            a = (cur_q // math.prod(qcounts[k + 1:])) % qcounts[k]
            first, cnt = ptr[a], ptr[a + 1] - ptr[a]
            rep, idx = expand_ranges(first, first + cnt - 1)
            cur_q, cur_full = cur_q[rep], cur_full[rep] & full[idx]
            cur_k = cur_k[rep] * kcounts[k] + kt[idx]
        return cur_q, cur_k, torch.where(cur_full, FULL, PARTIAL).to(torch.int8)

    def _grid_candidates(self, node: Window | Blocks):
        if self._flat_blocks(node):  # the hull of each q tile's span, as a range of flattened keys
            qmin, qmax = self.qg.span
            return expand_ranges(*self._kv_tile_range(*self._dim_rules(node)[0].hull(qmin, qmax)))
        qlo, qhi = self.qg.bbox
        region_lo, region_hi = [], []
        for k, rule in enumerate(self._dim_rules(node)):
            jmin, jmax = rule.hull(qlo[:, k], qhi[:, k])
            region_lo.append(jmin)
            region_hi.append(jmax)
        rlo, rhi = torch.stack(region_lo, 1), torch.stack(region_hi, 1)
        strides = torch.tensor(self.kg.strides)
        qt, kt = expand_ranges(*self._kv_tile_range((rlo * strides).sum(1), (rhi * strides).sum(1)))
        klo, khi = self.kg.bbox
        meets = ((klo[kt] <= rhi[qt]) & (khi[kt] >= rlo[qt])).all(1)
        return qt[meets], kt[meets]

    def _flat_blocks(self, node) -> bool:
        """Blocks of a 1-D spec: blocks of the flattened tokens (whatever the key grid's shape)."""
        return isinstance(node, Blocks) and self.spec.ndim == 1

    def _grid_status(self, node: Window | Blocks, qt, kt):
        """Exact status via every (q box, kv box) pair of each tile pair (1-D Blocks: via the
        tiles' flattened spans where tiles are runs of consecutive tokens, else token by token)."""
        if self._flat_blocks(node):
            if not (self.qg.contiguous and self.kg.contiguous):
                return self._refine(node, qt, kt)
            (qmin, qmax), (kmin, kmax) = self.qg.span, self.kg.span
            return status_of(*self._dim_rules(node)[0].status(qmin[qt], qmax[qt], kmin[kt], kmax[kt]))
        qlo, qhi, qv = self.qg.boxes
        klo, khi, kv = self.kg.boxes
        out = torch.empty(qt.shape, dtype=torch.int8)
        per = max(1, _CHUNK // (qlo.shape[1] * klo.shape[1] * 64))
        for i in range(0, len(qt), per):
            q, k = qt[i:i + per], kt[i:i + per]
            any_bb = all_bb = None
            for dim, rule in enumerate(self._dim_rules(node)):
                shape = (len(q), qlo.shape[1], klo.shape[1])
                a, al = rule.status(
                    qlo[q][:, :, None, dim].expand(shape), qhi[q][:, :, None, dim].expand(shape),
                    klo[k][:, None, :, dim].expand(shape), khi[k][:, None, :, dim].expand(shape))
                any_bb = a if any_bb is None else any_bb & a
                all_bb = al if all_bb is None else all_bb & al
            valid = qv[q][:, :, None] & kv[k][:, None, :]
            out[i:i + per] = status_of((any_bb & valid).flatten(1).any(1), (all_bb | ~valid).flatten(1).all(1))
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
        return status_of(any_, all_)

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
        st = status_of(hits > 0, hits == (a1 - a0) * (b1 - b0))
        if node.causal:
            st = self._combine(Intersection((node, Causal())), qt, kt, [st, self._band_status(Causal(), qt, kt)])
        return st


def has_routed(node: Pattern) -> bool:
    return any(isinstance(n, Routed) for n in node.walk())


def _selectivity_rank(node: Pattern) -> int:
    """Lower is more selective: the child an intersection classifies first."""
    if isinstance(node, (Window, Blocks, Band, Routed)):
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


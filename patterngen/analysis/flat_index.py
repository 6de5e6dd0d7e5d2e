"""Flattened-index patterns in closed form.

Full, Causal, Band, Sink, Global and Strided under any unions and intersections,
on tiles of consecutive tokens: written as a union of terms (a delta interval, a
query prefix, a key-only pattern), every tile pair is classified per q tile and per
run of kv tiles, so a plan costs time in the tile count, never in tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..core.semantics import depends_on_kv_only
from ..core.tiles import TileGrid
from ..ir import Band, Causal, Full, Global, Intersection, Pattern, Sink, Spec, Union
from .key_only import KvCount, kv_count_ok
from ..core.statuses import EMPTY, FULL, PARTIAL, expand_ranges, status_of

MAX_TERMS = 16         # union terms of a flattened-index pattern before the tree analysis takes over
ROWS_PER_BATCH = 1 << 15         # q tiles per batch of the closed-form plan and profile
PAIRS_PER_BATCH = 1 << 18        # tile pairs per batch of exact statuses

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
    primitive, more than `MAX_TERMS` terms or a key-only part too large to tabulate."""
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
        if len(terms) > MAX_TERMS:
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
        """EMPTY / PARTIAL / FULL of each (q tile, kv tile) pair, in batches of `PAIRS_PER_BATCH`."""
        out = torch.empty(qt.shape, dtype=torch.int8)
        for i in range(0, len(qt), PAIRS_PER_BATCH):
            out[i:i + PAIRS_PER_BATCH] = self._status(qt[i:i + PAIRS_PER_BATCH], kt[i:i + PAIRS_PER_BATCH])
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
        return status_of(any_, full)

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
        per = max(1, ROWS_PER_BATCH * 8 // (4 * len(self.terms) + 4))
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
            rep, idx = expand_ranges(start, start + count - 1)
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
            qt, kt = expand_ranges(r0[edge], r1[edge] - 1, rows[edge])
            st = self.status(qt, kt)
            visited.index_add_(0, qt, (st != EMPTY).long())
            full.index_add_(0, qt, (st == FULL).long())
        return visited, full

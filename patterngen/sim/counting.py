"""Exact visible (q, kv) pairs, the FLOP bound, counted at the pattern level, never on an Nq x Nkv mask.

The count does not depend on the tiling. A pattern is expanded into a signed sum of
conjunctions of atoms (`atoms.expand`), and each conjunction is counted:

* flattened-index atoms alone (bands, causal, prefixes, `Strided`) in closed form: for
  each query the keys form one interval, intersected with one residue class (the strides
  combine into a single congruence), and the interval's ends are linear in the query on a
  few stretches, so the sum over queries is a sum of floors of arithmetic progressions,
  O(1) whatever the token count;
* with 1-D windows or routed blocks row by row: each row's keys are still one interval (one
  per selected block) and one residue class (window dilations join the congruence), so each
  row costs O(1), in chunks of rows;
* windows alone as the product of per-dimension counts, each a sum over the L coordinates
  of one dimension;
* anything else (n-D windows mixed with flattened-index atoms) by the tile analysis of the
  conjunction and element-wise evaluation of its partial tiles (`core.tile_eval.tile_masks`);
  its cost is bounded by the partial tile pairs times the tile volume squared.
"""
from __future__ import annotations

import math

import torch

from ..ir import Band, Blocks, Causal, Full, Intersection, Pattern, Routed, Sink, Spec, Strided, Window
from ..analysis.plan import build_plan
from ..routing.blocks import normalize_block_indices
from ..core.semantics import block_index, group_length, unravel, visible, window_bounds
from ..core.statuses import expand_ranges
from ..core.tile_eval import CHUNK, Tokens, VisibleFn, grid_tokens, pattern_visible, tile_masks
from ..core.tiles import Tiling
from .atoms import KvBelow, QBelow, RoutedBlocks, Routes, TooManyTerms, as_routes, expand

ROWS = 1 << 21          # rows per chunk of `count_rows`
MAX_MODULUS = 1 << 22   # largest combined congruence modulus counted in closed form; above it, tiles
QUERY_ROWS = 1 << 25    # n-D windows with other atoms: enumerate window boxes up to this many pairs, else tiles


# -- integer helpers ----------------------------------------------------------------
def _floordiv(a: torch.Tensor, m) -> torch.Tensor:
    return torch.div(a, m, rounding_mode="floor")


def _count_congruent(A: torch.Tensor, B: torch.Tensor, c: torch.Tensor, m: int) -> torch.Tensor:
    """Number of x in [A, B] with x = c (mod m), elementwise (0 for empty intervals)."""
    n = _floordiv(B - c, m) - _floordiv(A - 1 - c, m)
    return torch.where(B >= A, n, torch.zeros_like(n))


def _congruence(stridings: list[tuple[int, int]], base: int):
    """Combine x = q (mod base) with x = o_i (mod s_i): for each class c mod base, the
    smallest solution in [0, M) (or -1 if none) and the combined modulus M."""
    M = base
    for s, _ in stridings:
        M = math.lcm(M, s)
    if M > MAX_MODULUS:
        return None, M
    xs = torch.arange(M)
    ok = torch.ones(M, dtype=torch.bool)
    for s, o in stridings:
        ok &= xs % s == o
    first = torch.full((base,), -1, dtype=torch.long)
    sol = xs[ok]
    if len(sol):  # each class mod base holds at most one class mod M: keep its smallest member
        cls = sol % base
        first.scatter_reduce_(0, cls, sol, reduce="amin", include_self=False)
    return first, M


# -- the per-conjunction counters ---------------------------------------------------
class _Conj:
    """A conjunction of atoms, normalised: delta bounds, prefixes, congruences, windows."""

    def __init__(self, atoms: frozenset, spec: Spec):
        off = spec.nkv - spec.nq
        self.q_end, self.kv_end = spec.nq, spec.nkv
        self.dlo, self.dhi = -(spec.nq + spec.nkv), spec.nq + spec.nkv  # bounds on kv - q
        self.strides: list[tuple[int, int]] = []
        self.windows: list[Window] = []
        self.grid_blocks: list[Blocks] = []
        self.blocks: int | None = None
        for a in atoms:
            if isinstance(a, KvBelow):
                self.kv_end = min(self.kv_end, a.n)
            elif isinstance(a, QBelow):
                self.q_end = min(self.q_end, a.n)
            elif isinstance(a, Causal):
                self.dhi = min(self.dhi, off)
            elif isinstance(a, Band):
                self.dlo, self.dhi = max(self.dlo, off - a.left), min(self.dhi, off + a.right)
            elif isinstance(a, Strided):
                self.strides.append((a.stride, a.offset))
            elif isinstance(a, Window):
                self.windows.append(a)
            elif isinstance(a, Blocks):
                self.grid_blocks.append(a)
            elif isinstance(a, RoutedBlocks):
                self.blocks = a.block
            else:  # pragma: no cover - atoms come from `expand`
                raise TypeError(f"unknown atom {a!r}")
        self.atoms = atoms


def _window_dims(windows: list[Window], ndim: int):
    """Per dimension: the (w, s, d, causal) of every window."""
    return list(zip(*[w.dims(ndim) for w in windows])) if windows else [()] * ndim


def _window_rows(i: torch.Tensor, L: int, dims, A: torch.Tensor, B: torch.Tensor):
    """Intersect [A, B] with the window intervals of coordinate i along one dimension;
    return the new bounds and the lcm D of the dilations (the visible keys are those of [A, B]
    congruent to i mod D)."""
    D = 1
    for (w, s, d, c) in dims:
        r = i % d
        lo, hi = window_bounds(i // d, group_length(L, d, r), w, s, c)
        A = torch.maximum(A, lo * d + r)
        B = torch.minimum(B, hi * d + r)
        D = math.lcm(D, d)
    return A, B, D


def count_rows(conj: _Conj, spec: Spec, routes: Routes | None) -> int | None:
    """Row-by-row count on the flattened index (1-D windows allowed); None if the
    congruences are too large for the closed form."""
    total = 0
    dims = _window_dims(conj.windows, 1)[0] if conj.windows else ()
    D0 = 1
    for (_, _, d, _) in dims:
        D0 = math.lcm(D0, d)
    first, M = _congruence(conj.strides, D0)
    if first is None:
        return None
    if conj.blocks is not None:
        blk = conj.blocks
        ptr, kbs = routes.ptr, routes.kb
    per_row = routes.max_per_row if conj.blocks is not None else 1
    step = max(1, ROWS // per_row)
    for start in range(0, conj.q_end, step):
        q = torch.arange(start, min(conj.q_end, start + step))
        if conj.blocks is not None:  # one row per (query, selected kv block)
            qb = q // blk
            q, pos = expand_ranges(ptr[qb], ptr[qb + 1] - 1, q)
            kb = kbs[pos]
            A, B = kb * blk, kb * blk + blk - 1
        else:
            A, B = torch.zeros_like(q), torch.full_like(q, conj.kv_end - 1)
        A = torch.maximum(A, q + conj.dlo)
        B = torch.minimum(torch.minimum(B, q + conj.dhi), torch.full_like(B, conj.kv_end - 1))
        if dims:
            A, B, _ = _window_rows(q, spec.q_shape[0], dims, A, B)
        x0 = first[q % D0]
        n = _count_congruent(A, B, x0, M)
        total += int(torch.where(x0 >= 0, n, torch.zeros_like(n)).sum())
    return total


def _floor_sum(n: int, m: int) -> int:
    """sum of floor(x / m) for x in [0, n), extended to every integer n so that
    _floor_sum(b + 1, m) - _floor_sum(a, m) sums x in [a, b] whatever their signs."""
    a, b = divmod(n, m)
    return m * a * (a - 1) // 2 + a * b


def count_closed(conj: _Conj) -> int | None:
    """Conjunction of flattened-index atoms without windows or routed blocks, in closed form:
    sum over queries q < q_end of the keys j in [max(0, q + dlo), min(kv_end - 1, q + dhi)]
    with j = c (mod M). Each end is linear in q or constant, switching once, so on each of at
    most four stretches of queries the sum is a difference of sums of floors of arithmetic
    progressions (None: congruence too large)."""
    first, M = _congruence(conj.strides, 1)
    if first is None:
        return None
    c = int(first[0])
    if c < 0:
        return 0
    dlo, dhi, kv_last = conj.dlo, conj.dhi, conj.kv_end - 1
    q_lo, q_hi = max(0, -dhi), min(conj.q_end - 1, kv_last - dlo)  # queries whose key range is not empty
    total = 0
    for a, b in ((q_lo, min(q_hi, -dlo - 1)), (max(q_lo, -dlo), q_hi)):  # lower end 0, then q + dlo
        for a2, b2, top_linear in ((a, min(b, kv_last - dhi), True), (max(a, kv_last - dhi + 1), b, False)):
            if a2 > b2:
                continue
            n = b2 - a2 + 1
            # keys <= upper end that are = c (mod M): floor((upper - c) / M) + const
            if top_linear:
                total += _floor_sum(b2 + dhi - c + 1, M) - _floor_sum(a2 + dhi - c, M)
            else:
                total += n * ((kv_last - c) // M)
            # minus keys < lower end
            if a >= -dlo:
                total -= _floor_sum(b2 + dlo - 1 - c + 1, M) - _floor_sum(a2 + dlo - 1 - c, M)
            else:
                total -= n * ((-1 - c) // M)
    return total


def _count_window_product(conj: _Conj, spec: Spec) -> int:
    """Conjunction of windows only: the product of per-dimension counts."""
    total = 1
    for dims, L in zip(_window_dims(conj.windows, spec.ndim), spec.q_shape):
        i = torch.arange(L)
        A, B, D = _window_rows(i, L, dims, torch.zeros_like(i), torch.full_like(i, L - 1))
        total *= int(_count_congruent(A, B, i % D, D).sum())
        if total == 0:
            break
    return total


def _count_window_query_rows(conj: _Conj, spec: Spec) -> int:
    """Few queries (q < n) with n-D windows: enumerate each query's window box of keys and
    evaluate the other atoms on it."""
    dims = _window_dims(conj.windows, spec.ndim)
    total = 0
    per = max(1, CHUNK // max(1, _box_volume(conj, spec)))
    for start in range(0, conj.q_end, per):
        q = torch.arange(start, min(conj.q_end, start + per))
        A, B = [], []
        for dd, L, c in zip(dims, spec.q_shape, unravel(q, spec.q_shape)):
            a, b, _ = _window_rows(c, L, dd, torch.zeros_like(c), torch.full_like(c, L - 1))
            A.append(a)
            B.append(b)
        sizes = torch.stack([(b - a + 1).clamp_min(0) for a, b in zip(A, B)], 1)  # [q, ndim]
        cnt = sizes.prod(1)
        rep, off = expand_ranges(torch.zeros_like(cnt), cnt - 1)
        kv = torch.zeros_like(off)
        for k in range(spec.ndim):  # mixed-radix digits of the offset inside the box
            inner = sizes[rep, k + 1:].prod(1) if k + 1 < spec.ndim else torch.ones_like(off)
            coord = A[k][rep] + (off // inner) % sizes[rep, k]
            kv = kv * spec.kv_shape[k] + coord
        m = torch.ones(len(rep), dtype=torch.bool)
        for a in conj.atoms:
            m &= _atom_visible(a, q[rep], kv, spec, None)
        total += int(m.sum())
    return total


def _box_volume(conj: _Conj, spec: Spec) -> int:
    """An upper bound of the keys in one query's window box."""
    vol = 1
    for dd, L in zip(_window_dims(conj.windows, spec.ndim), spec.q_shape):
        vol *= min([L] + [w * d for (w, _, d, _) in dd])
    return vol


def _atom_visible(atom, q: torch.Tensor, kv: torch.Tensor, spec: Spec, routes) -> torch.Tensor:
    if isinstance(atom, KvBelow):
        return kv < atom.n
    if isinstance(atom, QBelow):
        return q < atom.n
    if isinstance(atom, RoutedBlocks):
        return routes.mask[q // atom.block, kv // atom.block]
    return visible(atom, q, kv, spec)


def _conjunction(atoms, spec: Spec, routes: Routes | None) -> VisibleFn:
    """The element-wise rule of a conjunction of atoms."""
    def fn(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        m = torch.ones((), dtype=torch.bool)
        for a in atoms:
            m = m & _atom_visible(a, q, kv, spec, routes)
        return m
    return fn


def _count_masks(q_tokens: Tokens, kv_tokens: Tokens, n: int, q_volume: int, kv_volume: int, fn: VisibleFn) -> int:
    """Visible pairs of n tile pairs given by their tokens, element-wise."""
    return sum(int(m.sum()) for *_, m in tile_masks(q_tokens, kv_tokens, n, q_volume, kv_volume, fn))


def _count_tile_pairs(qg, kg, qt: torch.Tensor, kt: torch.Tensor, full: torch.Tensor, fn: VisibleFn) -> int:
    """Visible pairs of the tile pairs (qt, kt): full ones by their sizes, the others element-wise."""
    rest = ~full
    return int((qg.sizes[qt[full]] * kg.sizes[kt[full]]).sum()) + _count_masks(
        grid_tokens(qg, qt[rest]), grid_tokens(kg, kt[rest]), int(rest.sum()), qg.volume, kg.volume, fn)


def _count_tiles_fallback(conj: _Conj, spec: Spec, routes: Routes | None) -> int:
    """n-D windows mixed with flattened-index atoms: analyse the conjunction on small box
    tiles (or walk routed block pairs), then evaluate element-wise where needed."""
    if conj.blocks is not None:  # every selected (q block, kv block) pair, token by token
        blk = conj.blocks
        nz = torch.stack(routes.pairs(), 1)
        ar = torch.arange(blk)

        def block_tokens(side: int, n: int) -> Tokens:
            def tokens(a: int, b: int) -> torch.Tensor:
                t = nz[a:b, side, None] * blk + ar
                return torch.where(t < n, t, -1)
            return tokens
        return _count_masks(block_tokens(0, spec.nq), block_tokens(1, spec.nkv), len(nz), blk, blk,
                            _conjunction(conj.atoms - {RoutedBlocks(blk)}, spec, None))
    ir_atoms = [a if not isinstance(a, KvBelow) else Sink(a.n) for a in conj.atoms if not isinstance(a, QBelow)]
    pattern = Intersection.of(*ir_atoms) if ir_atoms else Full()
    tile = _counting_box(spec.q_shape) if conj.windows or conj.grid_blocks else 64  # flattened-index atoms: flat
    sub = Spec(pattern, spec.q_shape, spec.kv_shape)
    plan = build_plan(sub, Tiling(tile, tile))
    qt, kt, full = plan.groups[0].pairs()
    qg, kg = plan.q_grid, plan.kv_grid
    if conj.q_end < spec.nq:  # q < n: drop q tiles wholly past it, evaluate those that straddle it
        qmin, qmax = qg.span
        keep = qmin[qt] < conj.q_end
        qt, kt, full = qt[keep], kt[keep], full[keep] & (qmax[qt[keep]] < conj.q_end)
    return _count_tile_pairs(qg, kg, qt, kt, full, _conjunction(conj.atoms, spec, None))


def _counting_box(shape: tuple[int, ...], volume: int = 64) -> tuple[int, ...] | int:
    """A small box tile (volume <= 64) spread over the dimensions, last dimensions first."""
    if len(shape) == 1:
        return volume
    tile = [1] * len(shape)
    changed = True
    while changed and math.prod(tile) * 2 <= volume:
        changed = False
        for k in reversed(range(len(shape))):
            if tile[k] < shape[k] and math.prod(tile) * 2 <= volume:
                tile[k] *= 2
                changed = True
    return tuple(tile)


def _count_blocks(blocks: list[Blocks], spec: Spec) -> int:
    """Pairs in the same block of every `Blocks`, per dimension the sum over the common
    blocks of queries times keys (one pass over each extent), multiplied over dimensions."""
    off, extents = (spec.nkv - spec.nq, [(spec.nq, spec.nkv)]) if spec.ndim == 1 else (0, zip(spec.q_shape,
                                                                                                spec.kv_shape))
    total = 1
    for k, (nq, nkv) in enumerate(extents):
        same_q = same_k = None
        for b in blocks:
            size, shift = b.dims(spec.ndim)[k]
            bq, bk = block_index(torch.arange(nq) + off, size, shift), block_index(torch.arange(nkv), size, shift)
            # a pair must share the block of every Blocks: key the coordinates by their tuple of blocks
            same_q = bq[:, None] if same_q is None else torch.cat([same_q, bq[:, None]], 1)
            same_k = bk[:, None] if same_k is None else torch.cat([same_k, bk[:, None]], 1)
        keys, inv = torch.unique(torch.cat([same_q, same_k]), dim=0, return_inverse=True)
        cq = torch.bincount(inv[:nq], minlength=len(keys))
        ck = torch.bincount(inv[nq:], minlength=len(keys))
        total *= int((cq * ck).sum())
    return total


def count_conjunction(atoms: frozenset, spec: Spec, block_mask=None) -> int:
    """Exact number of (q, kv) pairs that satisfy every atom (`block_mask`: see count_pattern)."""
    routes = as_routes(block_mask)
    conj = _Conj(atoms, spec)
    if conj.q_end <= 0 or conj.kv_end <= 0 or conj.dlo > conj.dhi:
        return 0
    if conj.grid_blocks:
        if all(isinstance(a, Blocks) for a in atoms):
            return _count_blocks(conj.grid_blocks, spec)
        return _count_tiles_fallback(conj, spec, routes)
    if conj.windows and spec.ndim > 1:
        if conj.blocks is None and not conj.strides and conj.q_end == spec.nq and conj.kv_end == spec.nkv \
                and conj.dlo <= -spec.nq and conj.dhi >= spec.nkv:
            return _count_window_product(conj, spec)
        if conj.blocks is None and conj.q_end * _box_volume(conj, spec) <= QUERY_ROWS:
            return _count_window_query_rows(conj, spec)
        return _count_tiles_fallback(conj, spec, routes)
    n = count_closed(conj) if not conj.windows and conj.blocks is None else count_rows(conj, spec, routes)
    return _count_tiles_fallback(conj, spec, routes) if n is None else n


def count_pattern(pattern: Pattern, spec: Spec, block_mask=None) -> int:
    """Exact number of visible (q, kv) pairs of a Heads-free pattern on `spec`'s grids
    (`block_mask`: the routed blocks of one batch and head, as a bool [q_blocks, kv_blocks]
    tensor or `Routes`)."""
    routes = as_routes(block_mask)
    try:
        poly = expand(pattern)
    except TooManyTerms:
        return _count_pattern_tiles(pattern, spec, routes)
    return sum(c * count_conjunction(atoms, spec, routes) for atoms, c in poly.items())


def _count_pattern_tiles(pattern: Pattern, spec: Spec, routes: Routes | None) -> int:
    """Whole-pattern fallback: tile analysis, then element-wise on partial tiles."""
    routed = any(isinstance(n, Routed) for n in pattern.walk())
    grid = any(isinstance(n, (Window, Blocks)) for n in pattern.walk())
    tile = 64 if routed or not grid else _counting_box(spec.q_shape)
    sub = Spec(pattern, spec.q_shape, spec.kv_shape)
    indices = None
    if routed:  # the routes of one (batch, head) as indices of a one-head spec
        indices = routes.rows[None, None]
    plan = build_plan(sub, Tiling(tile, tile), indices)
    return _count_tile_pairs(plan.q_grid, plan.kv_grid, *plan.groups[0].pairs(),
                             pattern_visible(pattern, spec, routes.mask if routed else None))


def visible_pairs(spec: Spec, block_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Exact visible (q, kv) pairs per head: int64 [num_heads], or [B, num_heads] when
    the spec is routed (one count per batch and head of the block indices)."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a patterngen.Spec, got {type(spec).__name__}")
    indices = normalize_block_indices(spec, block_indices)
    if indices is None:
        memo: dict = {}
        for p in spec.head_patterns:
            if p not in memo:
                memo[p] = count_pattern(p, spec)
        return torch.tensor([memo[p] for p in spec.head_patterns], dtype=torch.long)
    nkb = -(-spec.nkv // spec.routed.block)
    out = torch.zeros(indices.shape[0], spec.num_heads, dtype=torch.long)
    memo = {}
    for b in range(indices.shape[0]):
        for h, p in enumerate(spec.head_patterns):
            routed = any(isinstance(n, Routed) for n in p.walk())
            key = (p, b, h) if routed else p
            if key not in memo:
                memo[key] = count_pattern(p, spec, Routes(indices[b, h], nkb) if routed else None)
            out[b, h] = memo[key]
    return out


def window_dim_visible(L: int, w: int, s: int, d: int, causal: bool) -> int:
    """Visible (i, j) coordinate pairs of one window dimension of extent L, counted per query
    coordinate (pairs, where `analysis.windows` classifies intervals of them)."""
    i = torch.arange(L)
    A, B, D = _window_rows(i, L, [(w, s, d, causal)], torch.zeros_like(i), torch.full_like(i, L - 1))
    return int(_count_congruent(A, B, i % D, D).sum())


__all__ = ["visible_pairs", "count_pattern", "count_conjunction", "window_dim_visible"]

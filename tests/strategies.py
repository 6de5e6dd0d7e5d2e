"""Hypothesis strategies for valid patterngen specs, tilings and routed block indices.

Sizes stay small (a few hundred tokens) so that every generated spec can be
checked against the dense oracle. Everything drawn here is valid by
construction; invalid inputs are the business of test_ir.py.
"""
from __future__ import annotations

import functools
import math
import os
import sys

import torch
from hypothesis import strategies as st

import patterngen as pg


def scaled(n: int) -> int:
    """A test's example count, times $PG_TEST_SCALE (default 1) for longer runs."""
    return max(1, round(n * float(os.environ.get("PG_TEST_SCALE", "1"))))


# Largest extent per dimension for 1-, 2- and 3-D grids: at most ~300 tokens.
_MAX_EXTENT = {1: 160, 2: 16, 3: 6}


# -- grids ----------------------------------------------------------------------
@st.composite
def shapes(draw, ndim: int | None = None, max_extent: int | None = None) -> tuple[int, ...]:
    """A 1-D, 2-D or 3-D grid shape of at most ~300 tokens."""
    nd = draw(st.integers(1, 3)) if ndim is None else ndim
    cap = _MAX_EXTENT[nd] if max_extent is None else max_extent
    return tuple(draw(st.lists(st.integers(1, cap), min_size=nd, max_size=nd)))


# -- primitives -------------------------------------------------------------------
def _maybe_scalar(draw, values: tuple):
    """One value for every dimension (when they agree, half the time) or the per-dim tuple."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return tuple(values)


@st.composite
def window_dims(draw, L: int) -> tuple[int, int, int, bool]:
    """(size, stride, dilation, causal) valid on an extent L:
    w >= 2 or w == L, 1 <= s <= w, w * d <= L."""
    if L == 1:
        w, d = 1, 1
    else:
        d = draw(st.one_of(st.just(1), st.integers(1, max(1, L // 2))))
        w = draw(st.integers(2, L // d))
    s = draw(st.integers(1, w))
    return w, s, d, draw(st.booleans())


@st.composite
def windows(draw, shape: tuple[int, ...]) -> pg.Window:
    """A Window valid on `shape`, with per-dimension size, stride, dilation and causality."""
    dims = [draw(window_dims(L)) for L in shape]
    size, stride, dilation, causal = zip(*dims)
    return pg.Window(_maybe_scalar(draw, size), _maybe_scalar(draw, stride),
                     _maybe_scalar(draw, dilation), _maybe_scalar(draw, causal))


def _small_or_any(hi: int):
    """Integers in 0..hi, biased towards small values (the interesting edge cases)."""
    return st.one_of(st.integers(0, min(hi, 8)), st.integers(0, hi))


@st.composite
def bands(draw, nq: int, nkv: int) -> pg.Band:
    return pg.Band(draw(_small_or_any(nq + nkv)), draw(_small_or_any(nq + nkv)))


@st.composite
def strideds(draw) -> pg.Strided:
    """Every s-th key, or half the time every s-th block of 2-40 keys (S2's block shards;
    blocks of 16 and 32 line up with the small kernel tiles the tests use)."""
    s = draw(st.integers(1, 6))
    block = draw(st.one_of(st.just(1), st.sampled_from([16, 32]), st.integers(2, 40)))
    return pg.Strided(s, draw(st.integers(0, s - 1)), block)


@st.composite
def blockss(draw, shape: tuple[int, ...]) -> pg.Blocks:
    """Blocks of 1..extent+2 coordinates per dimension (larger than the grid too), any shift."""
    sizes = [draw(st.integers(1, n + 2)) for n in shape]
    shifts = [draw(st.integers(0, b - 1)) for b in sizes]
    return pg.Blocks(_maybe_scalar(draw, tuple(sizes)), _maybe_scalar(draw, tuple(shifts)))


@functools.lru_cache(maxsize=None)
def leaves(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], window: bool = True):
    """Any non-routed primitive valid for these grids (Window only if `window`)."""
    nq, nkv = math.prod(q_shape), math.prod(kv_shape)
    options = [
        st.just(pg.Full()),
        st.just(pg.Causal()),
        bands(nq, nkv),
        st.integers(1, nkv).map(pg.Sink),
        st.integers(1, nkv).map(pg.Global),
        strideds(),
    ]
    if window:
        options.append(windows(q_shape))
    if len(q_shape) == 1 or q_shape == kv_shape:
        options.append(blockss(q_shape))
    return st.one_of(options)


def _combine(parts_and_op):
    parts, op = parts_and_op
    out = parts[0]
    for p in parts[1:]:
        out = (out | p) if op == "|" else (out & p)
    return out


@functools.lru_cache(maxsize=None)
def patterns(q_shape, kv_shape, window: bool = True, depth: int = 2):
    """Leaves, and unions/intersections of 2-3 parts nested up to `depth` levels."""
    leaf = leaves(q_shape, kv_shape, window)
    if depth == 0:
        return leaf
    sub = patterns(q_shape, kv_shape, window, depth - 1)
    composite = st.tuples(st.lists(sub, min_size=2, max_size=3), st.sampled_from("|&")).map(_combine)
    return st.one_of(leaf, leaf, composite)


def complementary(q_shape, kv_shape, window: bool = True):
    """Compositions whose parts are partial on the same tiles but whose union is full
    or intersection is empty: the cases that need element-wise refinement."""
    nq, nkv = math.prod(q_shape), math.prod(kv_shape)
    big = nq + nkv
    opts = [
        st.just(pg.Causal() | pg.Band(0, big)),
        st.integers(0, 4).map(lambda r: pg.Band(big, 0) | pg.Band(0, big) | pg.Band(r, r)),
        st.integers(1, 4).map(lambda s: _combine(([pg.Strided(s, o) for o in range(s)] + [pg.Causal()], "|"))),
        st.integers(2, 4).map(lambda s: pg.Strided(s, 0) & pg.Strided(s, s - 1)),
        st.integers(1, nkv).map(lambda n: pg.Global(n) | pg.Causal() | pg.Band(0, big)),
        st.integers(0, 6).map(lambda r: pg.Causal() & pg.Band(0, r)),
        st.integers(0, 6).map(lambda r: (pg.Causal() | pg.Band(0, r)) & pg.Band(r, r)),
    ]
    if window:
        opts.append(st.tuples(windows(q_shape), windows(q_shape)).map(lambda ab: ab[0] | ab[1]))
        opts.append(st.tuples(windows(q_shape), windows(q_shape)).map(lambda ab: ab[0] & ab[1]))
        opts.append(windows(q_shape).map(lambda w: w | pg.Causal() | pg.Band(0, big)))
    return st.one_of(opts)


# -- heads ------------------------------------------------------------------------
@st.composite
def head_keys(draw, num_heads: int) -> list:
    """A partition of range(num_heads) written as Heads keys (int, range or slice)."""
    groups: dict[int, list[int]] = {}
    for h in range(num_heads):
        groups.setdefault(draw(st.integers(0, num_heads - 1)), []).append(h)
    keys = []
    for members in groups.values():
        if len(members) == 1:
            h = members[0]
            keys.append(draw(st.sampled_from([h, range(h, h + 1), slice(h, h + 1)])))
            continue
        steps = {b - a for a, b in zip(members, members[1:])}
        if len(steps) > 1:  # not an arithmetic progression: one int key per head
            keys.extend(members)
            continue
        start, step, stop = members[0], steps.pop(), members[-1] + 1
        kind = draw(st.sampled_from(["range", "slice", "slice-open"]))
        if kind == "range":
            keys.append(range(start, stop, step) if step > 1 else range(start, stop))
        elif kind == "slice":
            keys.append(slice(start, stop, step if step > 1 else None))
        else:  # open ends where they reach the first or last head
            keys.append(slice(None if start == 0 else start, None if stop == num_heads else stop,
                              step if step > 1 else None))
    return keys


@st.composite
def heads_patterns(draw, num_heads: int, inner) -> pg.Heads:
    """Heads as a list (one pattern per head), as (key, pattern) pairs with int/range/slice keys,
    or as a dict where its keys are hashable (slices only from Python 3.12)."""
    form = draw(st.sampled_from(["list", "pairs", "dict"]))
    if form == "list":
        return pg.Heads([draw(inner) for _ in range(num_heads)])
    pairs = [(k, draw(inner)) for k in draw(head_keys(num_heads))]
    if form == "dict" and (sys.version_info >= (3, 12) or not any(isinstance(k, slice) for k, _ in pairs)):
        return pg.Heads(dict(pairs))
    return pg.Heads(pairs)


def resolve_head(pattern, head: int, num_heads: int):
    """The pattern of one head, resolved independently of patterngen's own resolver
    (used by the oracle tests)."""
    if isinstance(pattern, pg.Heads):
        if pattern.listed:
            return resolve_head(pattern.entries[head][1], head, num_heads)
        for key, pat in pattern.entries:
            if isinstance(key, int):
                hit = key == head
            elif isinstance(key, range):
                hit = head in key
            else:
                hit = head in range(num_heads)[slice(key.start, key.stop, key.step)]
            if hit:
                return resolve_head(pat, head, num_heads)
        raise AssertionError(f"head {head} not covered by {pattern!r}")
    if isinstance(pattern, (pg.Union, pg.Intersection)):
        parts = [resolve_head(p, head, num_heads) for p in pattern.parts]
        return _combine((parts, "|" if isinstance(pattern, pg.Union) else "&"))
    return pattern


# -- specs --------------------------------------------------------------------------
@st.composite
def head_counts(draw) -> tuple[int, int]:
    """(num_heads, num_kv_heads) with num_kv_heads dividing num_heads."""
    h = draw(st.integers(1, 4))
    return h, draw(st.sampled_from([k for k in range(1, h + 1) if h % k == 0]))


@st.composite
def grids(draw, ndim: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(q_shape, kv_shape, same): kv differs from q about a third of the time, usually
    with the same rank, sometimes with another (say text queries on image keys)."""
    q_shape = draw(shapes(ndim))
    if draw(st.integers(0, 2)) == 0:
        kv_rank = len(q_shape) if draw(st.integers(0, 2)) else draw(st.integers(1, 3))
        kv_shape = draw(shapes(kv_rank))
        return q_shape, kv_shape, kv_shape == q_shape
    return q_shape, q_shape, True


@st.composite
def specs(draw, ndim: int | None = None, refine: bool = True) -> pg.Spec:
    """A valid Spec: random grid, pattern (Window only when q and kv grids agree),
    heads (possibly a Heads shard, possibly inside a composition) and GQA."""
    q_shape, kv_shape, same = draw(grids(ndim))
    num_heads, num_kv_heads = draw(head_counts())
    pat = patterns(q_shape, kv_shape, window=same)
    if refine:
        pat = st.one_of(pat, pat, complementary(q_shape, kv_shape, window=same))
    kind = draw(st.sampled_from(["plain", "plain", "heads", "heads-op"]))
    if kind == "plain":
        pattern = draw(pat)
    else:
        inner = patterns(q_shape, kv_shape, window=same, depth=1)
        pattern = draw(heads_patterns(num_heads, inner))
        if kind == "heads-op":
            other = draw(leaves(q_shape, kv_shape, window=same))
            pattern = (pattern | other) if draw(st.booleans()) else (other & pattern)
    return pg.Spec(pattern, q_shape, kv_shape, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=draw(st.sampled_from([16, 32, 64, 128])))


# -- tilings --------------------------------------------------------------------------
def _tile(shape: tuple[int, ...], box: bool):
    if not box:
        return st.integers(1, 16)
    return st.lists(st.integers(1, 4), min_size=len(shape), max_size=len(shape)).map(tuple)


@st.composite
def tilings(draw, q_shape, kv_shape, box: bool | None = None) -> pg.Tiling:
    """Flat int tiles (1..16) or box tiles (1..4 per dimension), the same kind for q and kv.

    A box on a 1-D grid is a flat tile, so an n-D query grid with a 1-D key grid
    gets flat tiles on both.
    """
    box = draw(st.booleans()) if box is None else box
    if box and len(q_shape) > 1 and len(kv_shape) == 1:
        box = False
    return pg.Tiling(draw(_tile(q_shape, box)), draw(_tile(kv_shape, box)))


@st.composite
def specs_and_tilings(draw, ndim: int | None = None):
    spec = draw(specs(ndim))
    return spec, draw(tilings(spec.q_shape, spec.kv_shape))


# -- routed -------------------------------------------------------------------------
@st.composite
def block_indices(draw, spec: pg.Spec, batch: bool | None = None, kv_heads: bool | None = None) -> torch.Tensor:
    """Random run-time indices for a routed spec: [H or Hkv, q_blocks, k] or with a batch
    dim, k <= topk, entries in -1..key_blocks-1 with duplicates and unused (-1) slots."""
    r = spec.routed
    nqb, nkb = -(-spec.nq // r.block), -(-spec.nkv // r.block)
    batch = draw(st.booleans()) if batch is None else batch
    kv_heads = draw(st.booleans()) if kv_heads is None else kv_heads
    heads = spec.num_kv_heads if kv_heads else spec.num_heads
    k = draw(st.integers(1, r.topk))
    shape = ((draw(st.integers(1, 2)),) if batch else ()) + (heads, nqb, k)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # a small pool of blocks makes duplicates likely; -1 marks unused slots
    pool = draw(st.integers(1, nkb))
    idx = torch.randint(0, pool, shape, generator=gen)
    idx = torch.where(torch.rand(shape, generator=gen) < draw(st.sampled_from([0.0, 0.2, 0.6])), -1, idx)
    if draw(st.booleans()):  # spread over every key block, not just the pool
        idx = torch.where(idx >= 0, torch.randint(0, nkb, shape, generator=gen), idx)
    return idx


@st.composite
def routed_specs(draw):
    """(spec, block_indices) with Routed nodes sharing one (block, topk), alone, composed
    with other primitives, or on some heads only."""
    q_shape, kv_shape, same = draw(grids())
    nkv = math.prod(kv_shape)
    num_heads, num_kv_heads = draw(head_counts())
    block = draw(st.integers(1, 16))
    topk = draw(st.integers(1, -(-nkv // block)))
    routed = st.booleans().map(lambda c: pg.Routed(block, topk, causal=c))
    kind = draw(st.sampled_from(["alone", "composed", "composed", "heads"]))
    if kind == "alone":
        pattern = draw(routed)
    elif kind == "composed":
        other = draw(patterns(q_shape, kv_shape, window=same, depth=1))
        r = draw(routed)
        pattern = draw(st.sampled_from([r | other, r & other, other | r]))
        if draw(st.booleans()):
            pattern = pattern | draw(routed)
    else:
        inner = st.one_of(patterns(q_shape, kv_shape, window=same, depth=1), routed)
        pattern = draw(heads_patterns(num_heads, inner))
    if spec_routed_missing(pattern, num_heads):
        pattern = pattern | draw(routed)
    spec = pg.Spec(pattern, q_shape, kv_shape, num_heads=num_heads, num_kv_heads=num_kv_heads)
    return spec, draw(block_indices(spec))


def spec_routed_missing(pattern, num_heads: int) -> bool:
    """True if no head of `pattern` uses a Routed node (the spec would not be routed)."""
    return not any(isinstance(n, pg.Routed) for h in range(num_heads)
                   for n in resolve_head(pattern, h, num_heads).walk())


@st.composite
def runtime_specs(draw, box: bool):
    """(spec, its lengths (nq, nkv)) holding a run-time node: `Clustered()` on a length-free
    sequence, or box-routed blocks (`box`) on a 2-D or 3-D grid; alone, inside unions and
    intersections (nested) of any primitive, and on some heads of a Heads: every head class of
    patterngen.runtime (static, the node alone, mixed)."""
    num_heads, num_kv_heads = draw(head_counts())
    if box:
        dims = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=2, max_size=3))
        block = tuple(b for b, _ in dims)
        q_shape = kv_shape = tuple(b * n for b, n in dims)
        node = pg.Routed(block, draw(st.integers(1, math.prod(n for _, n in dims))))
    else:
        q_shape, kv_shape = (draw(st.integers(0, 24)),), (draw(st.integers(0, 24)),)
        node = pg.Clustered()
    other = patterns(tuple(max(1, n) for n in q_shape), tuple(max(1, n) for n in kv_shape), window=box, depth=1)
    part = st.one_of(st.just(node), other)
    mixed = st.tuples(st.lists(part, min_size=2, max_size=3), st.sampled_from("|&")).map(_combine)
    nested = st.tuples(st.lists(st.one_of(mixed, part), min_size=2, max_size=2), st.sampled_from("|&")).map(_combine)
    inner = st.one_of(st.just(node), mixed, nested, other)
    pattern = draw(st.one_of(inner, heads_patterns(num_heads, inner)))
    if not any(node in resolve_head(pattern, h, num_heads).walk() for h in range(num_heads)):
        pattern = pattern | node
    spec = pg.Spec(pattern, q_shape if box else None, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8)
    return spec, (math.prod(q_shape), math.prod(kv_shape))


# -- kernels --------------------------------------------------------------------------------
KERNEL_HEAD_DIMS = (16, 24, 48, 64, 80, 128, 256)
"""Head dims of the kernel tests: powers of two and dims the kernels pad (BLOCK_D > head_dim)."""


def kernel_head_dims():
    return st.sampled_from(KERNEL_HEAD_DIMS)


def kernel_head_counts():
    """(num_heads, num_kv_heads): MHA, MQA and GQA with several kv heads (where a wrong map from
    query head to kv head shows)."""
    return st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)])


def flat_kernel_tiles():
    """Flat kernel tiles (a power of two >= 16, as tl.dot needs); 16 twice as likely (more tile edges)."""
    return st.sampled_from([16, 16, 32, 64, 128])


@st.composite
def box_kernel_tiles(draw, ndim: int) -> tuple[int, ...]:
    """A box kernel tile of `ndim` (2 or 3) power-of-two sides and 16..64 tokens."""
    sides = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=ndim - 1, max_size=ndim - 1))
    p = math.prod(sides)
    return (*sides, draw(st.sampled_from([x for x in (1, 2, 4, 8, 16) if 16 <= p * x <= 64])))


@st.composite
def window_strides(draw, w: int) -> int:
    """A stride for a window of size w: 1, an even or an odd 1 < s < w, or s == w (blocked),
    each kind as likely where it exists (s // 2 and (s - 1) // 2 differ for even s only)."""
    kinds = [r for r in (range(1, 2), range(2, w, 2), range(3, w, 2), range(w, w + 1)) if len(r)]
    return draw(st.sampled_from(draw(st.sampled_from(kinds))))


@st.composite
def undilated_windows(draw, shape: tuple[int, ...], near: int | None = None) -> pg.Window:
    """An undilated Window on `shape`: per dimension a size (small ones likely, and with `near`,
    a tile size, sizes next to its multiples, where window edges meet tile edges), a stride
    (`window_strides`) and a causal flag."""
    size, stride, causal = [], [], []
    for L in shape:
        sizes = [st.integers(2, min(L, 16)), st.integers(2, L)]
        if near is not None and L >= near + 2:  # the window or its half next to a multiple of the tile
            edges = sorted({v for m in range(near, L + 3, near) for e in range(-2, 3) for v in (m + e, 2 * m + e)
                            if 2 <= v <= L})
            sizes.append(st.sampled_from(edges))
        w = 1 if L == 1 else draw(st.one_of(sizes))
        size.append(w)
        stride.append(draw(window_strides(w)))
        causal.append(draw(st.booleans()))
    return pg.Window(_maybe_scalar(draw, tuple(size)), _maybe_scalar(draw, tuple(stride)), 1,
                     _maybe_scalar(draw, tuple(causal)))

"""The dense oracle against formulas written out here, independently of
patterngen.core.semantics: one per primitive, for heads, and for composition."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import (block_indices, grids, head_counts, heads_patterns, patterns, resolve_head, routed_specs,
                        scaled, shapes, specs, strideds, windows)


def table(fn, nq: int, nkv: int) -> torch.Tensor:
    """bool [nq, nkv] with fn(i, j) at (i, j)."""
    return torch.tensor([[bool(fn(i, j)) for j in range(nkv)] for i in range(nq)], dtype=torch.bool).view(nq, nkv)


def unravel(t: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(t % n)
        t //= n
    return tuple(reversed(out))


# -- flattened-index primitives ---------------------------------------------------
def direct_flat(pattern, nq: int, nkv: int) -> torch.Tensor:
    """The documented meaning of each flattened primitive; Causal and Band align the
    last query with the last key."""
    shift = nkv - nq  # query i sits at key position i + shift

    if isinstance(pattern, pg.Full):
        fn = lambda i, j: True  # noqa: E731
    elif isinstance(pattern, pg.Causal):
        fn = lambda i, j: j <= i + shift  # noqa: E731
    elif isinstance(pattern, pg.Band):
        fn = lambda i, j: i + shift - pattern.left <= j <= i + shift + pattern.right  # noqa: E731
    elif isinstance(pattern, pg.Sink):
        fn = lambda i, j: j < pattern.n  # noqa: E731
    elif isinstance(pattern, pg.Global):
        fn = lambda i, j: j < pattern.n or i < pattern.n  # noqa: E731
    elif isinstance(pattern, pg.Strided):
        fn = lambda i, j: (j // pattern.block) % pattern.stride == pattern.offset  # noqa: E731
    else:
        raise AssertionError(pattern)
    return table(fn, nq, nkv)


@st.composite
def flat_cases(draw):
    q_shape, kv_shape, _ = draw(grids())
    nq, nkv = math.prod(q_shape), math.prod(kv_shape)
    big = nq + nkv
    leaf = draw(st.one_of(
        st.just(pg.Full()), st.just(pg.Causal()),
        st.tuples(st.integers(0, big), st.integers(0, big)).map(lambda lr: pg.Band(*lr)),
        st.tuples(st.integers(0, 5), st.integers(0, 5)).map(lambda lr: pg.Band(*lr)),
        st.integers(1, nkv).map(pg.Sink), st.integers(1, nkv).map(pg.Global), strideds()))
    return pg.Spec(leaf, q_shape, kv_shape, num_heads=draw(st.integers(1, 3)))


@settings(max_examples=scaled(150))
@given(flat_cases())
@example(pg.Spec(pg.Causal(), 5, kv_shape=9))
@example(pg.Spec(pg.Causal(), 9, kv_shape=5))
@example(pg.Spec(pg.Band(2, 1), 4, kv_shape=10))
@example(pg.Spec(pg.Band(0, 3), 10, kv_shape=4))
@example(pg.Spec(pg.Global(3), (2, 3), kv_shape=(4, 4)))
def test_flattened_primitives(spec):
    mask = pg.dense_mask(spec)
    assert mask.dtype == torch.bool and mask.shape == (spec.num_heads, spec.nq, spec.nkv)
    want = direct_flat(spec.pattern, spec.nq, spec.nkv)
    for h in range(spec.num_heads):
        assert torch.equal(mask[h], want), spec


def test_causal_and_band_alignment_examples():
    # 3 queries, 5 keys: the last query sees every key, the first sees keys 0..2
    m = pg.dense_mask(pg.Spec(pg.Causal(), 3, kv_shape=5))[0]
    assert m.sum(1).tolist() == [3, 4, 5]
    # 5 queries, 3 keys: the first two queries see nothing
    m = pg.dense_mask(pg.Spec(pg.Causal(), 5, kv_shape=3))[0]
    assert m.sum(1).tolist() == [0, 0, 1, 2, 3]
    m = pg.dense_mask(pg.Spec(pg.Band(1), 2, kv_shape=6))[0]
    assert m.nonzero().tolist() == [[0, 3], [0, 4], [1, 4], [1, 5]]


# -- Window -------------------------------------------------------------------------
def window_1d_reference(i: int, j: int, L: int, w: int, s: int, d: int, causal: bool) -> bool:
    """DESIGN.md's statement of NATTEN's rule along one dimension, transcribed literally."""
    if i % d != j % d:
        return False
    x, y = i // d, j // d
    Lg = L // d + (1 if i % d < L % d else 0)
    if causal:
        leader = min((x // s) * s + s - 1, Lg - 1)
        return y <= x and leader - y < w
    wl, wr = w // 2, w // 2 + w % 2 - 1
    leader = min((x // s) * s + s // 2, Lg - 1)
    centre = min(max(leader, wl), Lg - 1 - wr)
    return centre - wl <= y <= centre + wr


def direct_window(window: pg.Window, shape: tuple[int, ...]) -> torch.Tensor:
    """The n-D window as the AND over dimensions of the 1-D rule on grid coordinates."""
    n = math.prod(shape)
    coords = torch.tensor([unravel(t, shape) for t in range(n)], dtype=torch.long).view(n, len(shape))
    out = torch.ones(n, n, dtype=torch.bool)
    for k, ((w, s, d, c), L) in enumerate(zip(window.dims(len(shape)), shape)):
        t1 = table(lambda i, j: window_1d_reference(i, j, L, w, s, d, c), L, L)
        out &= t1[coords[:, k][:, None], coords[:, k][None, :]]
    return out


@st.composite
def window_specs(draw, causal: bool | None = None, stride_one: bool = False, dilation_one: bool = False):
    shape = draw(shapes())
    win = draw(windows(shape))
    size, stride, dilation, c = zip(*win.dims(len(shape)))
    if causal is not None:
        c = (causal,) * len(shape)
    if stride_one:
        stride = (1,) * len(shape)
    if dilation_one:
        dilation = (1,) * len(shape)
        size = tuple(w if w * d <= L else L for w, d, L in zip(size, dilation, shape))
    return pg.Spec(pg.Window(size, stride, dilation, c), shape, num_heads=draw(st.integers(1, 2)))


@settings(max_examples=scaled(120))
@given(window_specs())
@example(pg.Spec(pg.Window(4, stride=3, dilation=2), 11))
@example(pg.Spec(pg.Window((2, 3), stride=(2, 2), dilation=(3, 1), causal=(True, False)), (7, 5)))
@example(pg.Spec(pg.Window((1, 4, 2), causal=True), (1, 5, 5)))
def test_window_matches_reference_rule(spec):
    mask = pg.dense_mask(spec)
    want = direct_window(spec.pattern, spec.q_shape)
    for h in range(spec.num_heads):
        assert torch.equal(mask[h], want)


@settings(max_examples=scaled(80))
@given(window_specs())
def test_window_is_and_of_1d_windows(spec):
    """The mask of an n-D window is the AND of the oracle's own 1-D masks."""
    shape = spec.q_shape
    n = spec.nq
    coords = torch.tensor([unravel(t, shape) for t in range(n)], dtype=torch.long).view(n, len(shape))
    want = torch.ones(n, n, dtype=torch.bool)
    for k, ((w, s, d, c), L) in enumerate(zip(spec.pattern.dims(len(shape)), shape)):
        m1 = pg.dense_mask(pg.Spec(pg.Window(w, s, d, c), L))[0]
        want &= m1[coords[:, k][:, None], coords[:, k][None, :]]
    assert torch.equal(pg.dense_mask(spec)[0], want)


@settings(max_examples=scaled(80))
@given(window_specs(causal=False, stride_one=True, dilation_one=True))
def test_window_neighborhood_counts(spec):
    """Non-causal stride-1, dilation-1 windows: every query sees exactly prod(w) keys."""
    sizes = [w for w, _, _, _ in spec.pattern.dims(spec.ndim)]
    assert (pg.dense_mask(spec)[0].sum(1) == math.prod(sizes)).all()


@settings(max_examples=scaled(80))
@given(window_specs(causal=False))
def test_window_counts_with_stride_and_dilation(spec):
    """The window shifts at the borders, so the count stays prod(w) with any stride and dilation."""
    sizes = [w for w, _, _, _ in spec.pattern.dims(spec.ndim)]
    mask = pg.dense_mask(spec)[0]
    assert (mask.sum(1) == math.prod(sizes)).all()
    assert mask.diagonal().all()  # every query sees itself


@settings(max_examples=scaled(60))
@given(window_specs(causal=True, stride_one=True))
def test_causal_window_counts(spec):
    """Causal stride-1: along each dimension query x of its dilation group sees min(x + 1, w) keys."""
    dims = spec.pattern.dims(spec.ndim)
    mask = pg.dense_mask(spec)[0]
    for t in range(spec.nq):
        c = unravel(t, spec.q_shape)
        want = math.prod(min(ci // d + 1, w) for ci, (w, _, d, _) in zip(c, dims))
        assert int(mask[t].sum()) == want
    assert mask.diagonal().all()


# -- Routed -------------------------------------------------------------------------
def direct_routed(spec: pg.Spec, indices: torch.Tensor) -> torch.Tensor:
    """bool [B, H, nq, nkv] for a spec whose every head is a single Routed node."""
    r = spec.routed
    idx = indices if indices.dim() == 4 else indices[None]
    group = spec.num_heads // idx.shape[1]  # 1, or query heads per kv head for shared indices
    shift = spec.nkv - spec.nq
    out = torch.zeros(idx.shape[0], spec.num_heads, spec.nq, spec.nkv, dtype=torch.bool)
    for b in range(idx.shape[0]):
        for h in range(spec.num_heads):
            rows = idx[b, h // group].tolist()
            out[b, h] = table(lambda i, j: j // r.block in rows[i // r.block] and (not r.causal or j <= i + shift),
                              spec.nq, spec.nkv)
    return out


@st.composite
def routed_only(draw):
    q_shape, kv_shape, _ = draw(grids())
    nkv = math.prod(kv_shape)
    h, hkv = draw(head_counts())
    block = draw(st.integers(1, 12))
    r = pg.Routed(block, draw(st.integers(1, -(-nkv // block))), causal=draw(st.booleans()))
    spec = pg.Spec(r, q_shape, kv_shape, num_heads=h, num_kv_heads=hkv)
    return spec, draw(block_indices(spec))


@settings(max_examples=scaled(100))
@given(routed_only())
def test_routed_matches_direct(case):
    spec, idx = case
    mask = pg.dense_mask(spec, idx)
    want = direct_routed(spec, idx)
    assert mask.shape == (want.shape if idx.dim() == 4 else want.shape[1:])
    assert torch.equal(mask, want if idx.dim() == 4 else want[0])


def test_routed_gqa_shared_indices_example():
    spec = pg.Spec(pg.Routed(2, 2), 6, num_heads=4, num_kv_heads=2)
    idx = torch.tensor([[[0, 0], [2, -1], [-1, -1]], [[1, 2], [0, 1], [2, 2]]])  # [Hkv, 3 q blocks, 2]
    m = pg.dense_mask(spec, idx)
    assert m.shape == (4, 6, 6)
    assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3])
    assert m[0].sum(1).tolist() == [2, 2, 2, 2, 0, 0]
    assert m[0, 2].nonzero().flatten().tolist() == [4, 5]
    assert m[2, 4].nonzero().flatten().tolist() == [4, 5]
    batched = torch.stack([idx, idx.flip(0)])
    mb = pg.dense_mask(spec, batched)
    assert mb.shape == (2, 4, 6, 6)
    assert torch.equal(mb[0], m) and torch.equal(mb[1, 0], m[2])


# -- heads and composition --------------------------------------------------------------
@settings(max_examples=scaled(100))
@given(specs())
def test_heads_route_each_head_to_its_pattern(spec):
    mask = pg.dense_mask(spec)
    assert mask.shape == (spec.num_heads, spec.nq, spec.nkv)
    for h in range(spec.num_heads):
        own = resolve_head(spec.pattern, h, spec.num_heads)
        assert torch.equal(mask[h], pg.dense_mask(pg.Spec(own, spec.q_shape, spec.kv_shape))[0]), (spec, h)


@settings(max_examples=scaled(60))
@given(st.data())
def test_heads_list_and_dict(data):
    q_shape, kv_shape, same = data.draw(grids())
    h = data.draw(st.integers(1, 4))
    heads = data.draw(heads_patterns(h, patterns(q_shape, kv_shape, same, depth=1)))
    mask = pg.dense_mask(pg.Spec(heads, q_shape, kv_shape, num_heads=h))
    for head in range(h):
        own = resolve_head(heads, head, h)
        assert torch.equal(mask[head], pg.dense_mask(pg.Spec(own, q_shape, kv_shape))[0])


@settings(max_examples=scaled(100))
@given(st.data())
def test_union_and_intersection_are_or_and(data):
    q_shape, kv_shape, same = data.draw(grids())
    parts = data.draw(st.lists(patterns(q_shape, kv_shape, same, depth=1), min_size=2, max_size=3))
    masks = [pg.dense_mask(pg.Spec(p, q_shape, kv_shape))[0] for p in parts]
    union, inter = parts[0], parts[0]
    for p in parts[1:]:
        union, inter = union | p, inter & p
    want_or, want_and = masks[0].clone(), masks[0].clone()
    for m in masks[1:]:
        want_or |= m
        want_and &= m
    assert torch.equal(pg.dense_mask(pg.Spec(union, q_shape, kv_shape))[0], want_or)
    assert torch.equal(pg.dense_mask(pg.Spec(inter, q_shape, kv_shape))[0], want_and)


@settings(max_examples=scaled(60))
@given(routed_specs())
def test_routed_compositions(case):
    """Routed inside unions, intersections and Heads: each head (and batch) is the
    or/and of its parts, Routed parts from the direct formula."""
    spec, idx = case
    mask = pg.dense_mask(spec, idx)
    mask = mask if idx.dim() == 4 else mask[None]
    normalized = idx if idx.dim() == 4 else idx[None]
    group = spec.num_heads // normalized.shape[1]

    def evaluate(pattern, b, h):
        if isinstance(pattern, pg.Routed):
            one = pg.Spec(pattern, spec.q_shape, spec.kv_shape)
            return direct_routed(one, normalized[b:b + 1, h // group:h // group + 1])[0, 0]
        if isinstance(pattern, (pg.Union, pg.Intersection)):
            ms = [evaluate(p, b, h) for p in pattern.parts]
            out = ms[0].clone()
            for m in ms[1:]:
                out = (out | m) if isinstance(pattern, pg.Union) else (out & m)
            return out
        return pg.dense_mask(pg.Spec(pattern, spec.q_shape, spec.kv_shape))[0]

    for b in range(mask.shape[0]):
        for h in range(spec.num_heads):
            assert torch.equal(mask[b, h], evaluate(resolve_head(spec.pattern, h, spec.num_heads), b, h))


def test_dense_mask_rejects_bad_block_indices():
    spec = pg.Spec(pg.Routed(4, 2), 16, num_heads=2)
    with pytest.raises(ValueError, match="block_indices"):
        pg.dense_mask(spec)
    with pytest.raises(ValueError, match="block_indices"):
        pg.dense_mask(spec, torch.zeros(2, 3, 2, dtype=torch.long))  # 3 q blocks instead of 4
    with pytest.raises(ValueError, match="block_indices"):
        pg.dense_mask(spec, torch.full((2, 4, 2), 4))  # key block 4 of 0..3
    with pytest.raises(ValueError, match="topk"):
        pg.dense_mask(spec, torch.zeros(2, 4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="block_indices"):
        pg.dense_mask(spec, torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="block_indices"):
        pg.dense_mask(pg.Spec(pg.Causal(), 16), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="spec"):
        pg.dense_mask(pg.Causal())

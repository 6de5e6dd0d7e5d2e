"""Every kv walk of the generated kernels, forward and backward, against the float64 oracle.

The generator picks one walk per forward kernel (`fwd.walk.name`): `closed_form` (one static
pattern on flat tiles, kv ranges as formulas), `window` (a single undilated Window on a fixed
grid), `table` (the plan's index table: head groups, dilations, grids that differ, ...) and
`routed` (the table, then run-time blocks); the head-routed kernels walk `tile_union` or
`window`. The dQ kernel walks as the forward does, on its own (transposed) tiling, and dK/dV
the plan's transpose. Each test draws specs for one walk, asserts that the forward and dQ
kernels took it and compares out, lse, dq, dk and dv in fp32 under
TRITON_INTERPRET=1 with `dense_attention` / `dense_gradients`. The draws aim at the bounds:
even and odd window strides and blocked windows, causal flags per dimension, ragged grids,
kv length != q length, dilations, GQA, head dims up to 256 and tiles up to 128 tokens.

Kernel modules are cached per rendered source, and sympy's closed forms per pattern and
tiles, so cases share them where they can (several lengths for one length-free kernel).
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.helpers import dense_attention, dense_gradients
from tests.strategies import (box_kernel_tiles, flat_kernel_tiles, kernel_head_counts, kernel_head_dims,
                              scaled, undilated_windows, window_dims, window_strides)

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter
from patterngen.backends.triton import TritonBackward, TritonForward, TritonHeads, backward_tiling  # noqa: E402

ATOL, RTOL = 2e-4, 1e-4


# -- checks ---------------------------------------------------------------------------------
def describe(text: str) -> None:
    """A hypothesis note for the failing example (the edge cases run outside hypothesis)."""
    if currently_in_test_context():
        note(text)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want.to(got.dtype), atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def assert_lse(lse: torch.Tensor, want: torch.Tensor) -> None:
    """-inf exactly where the oracle's row sees nothing, close elsewhere."""
    assert torch.equal(torch.isinf(lse), torch.isinf(want)), "lse: rows without a visible key differ"
    finite = torch.isfinite(want)
    assert_close("lse", lse[finite], want[finite])


def inputs(spec: pg.Spec, nq: int, nkv: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, spec.head_dim, generator=g)
                 for h, n in ((spec.num_heads, nq), (spec.num_kv_heads, nkv), (spec.num_kv_heads, nkv)))


def check_kernels(spec: pg.Spec, tiling: pg.Tiling, walk: str, lengths=None, batch: int = 1, seed: int = 0,
                  indices=None) -> None:
    """The forward kernel of `spec` and `tiling` walks `walk` (dQ too, on the same tiles); its
    (out, lse) and the backward's (dq, dk, dv), at the op's backward tiling, equal the oracle's at each (nq, nkv) of
    `lengths` (a length-free spec) or the spec's own. `indices(bound spec, batch)` gives a routed
    spec's block indices."""
    describe(f"spec={spec!r} tiling={tiling!r}")
    fwd = TritonForward(spec, tiling)
    assert fwd.walk.name == walk, f"{spec!r} {tiling!r}: walk {fwd.walk.name!r}, expected {walk!r}"
    bwd = TritonBackward(TritonForward(spec, backward_tiling(tiling, spec.head_dim, spec)))
    # dQ walks as a forward on its tiles would (a box forward's backward may run flat tiles, and
    # then closed forms where the forward walked its table)
    dq_walk = walk if bwd.dq.tiling == tiling else TritonForward(spec, bwd.dq.tiling).walk.name
    assert bwd.module.WALK == dq_walk, f"{spec!r}: dQ walk {bwd.module.WALK!r}, expected {dq_walk!r}"
    for nq, nkv in lengths or [(spec.nq, spec.nkv)]:
        bound = spec.bind(nq, nkv) if spec.length_free else spec
        idx = None if indices is None else indices(bound, batch)
        describe(f"nq={nq} nkv={nkv} block_indices={None if idx is None else idx.tolist()}")
        q, k, v = inputs(spec, nq, nkv, batch, seed)
        out, lse = fwd(q, k, v, block_indices=idx)
        want_out, want_lse = dense_attention(q, k, v, bound, idx)
        assert_close("out", out, want_out)
        assert_lse(lse, want_lse)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        grads = bwd(q, k, v, out, lse, dout, block_indices=idx)
        for name, got, want in zip(("dq", "dk", "dv"), grads, dense_gradients(q, k, v, dout, bound, idx)):
            assert_close(name, got, want)


def check_forward(spec: pg.Spec, tiling: pg.Tiling, walk: str, seed: int = 0) -> None:
    """Only the forward (cheap; dQ takes the same walks on its own tiles: `check_kernels`)."""
    fwd = TritonForward(spec, tiling)
    assert fwd.walk.name == walk, f"{spec!r} {tiling!r}: walk {fwd.walk.name!r}, expected {walk!r}"
    q, k, v = inputs(spec, spec.nq, spec.nkv, 1, seed)
    out, lse = fwd(q, k, v)
    want_out, want_lse = dense_attention(q, k, v, spec)
    assert_close(f"{spec!r} {tiling!r} out", out, want_out)
    assert_lse(lse, want_lse)


def check_head_routed(spec: pg.Spec, tiling: pg.Tiling, walk: str, head_indices: torch.Tensor, seed: int) -> None:
    """Head-routed kernels (`TritonHeads`) walk `walk` and equal the oracle with the unchosen
    (token, head) rows zeroed: out 0, lse -inf, dq 0, and nothing from them in dk, dv."""
    describe(f"spec={spec!r} tiling={tiling!r} head_indices={head_indices.tolist()}")
    fwd, bwd = TritonHeads(spec, tiling), TritonHeads(spec, backward_tiling(tiling, spec.head_dim))
    assert fwd.walk.name == bwd.walk.name == walk, f"{spec!r} {tiling!r}: walk {fwd.walk.name!r}, expected {walk!r}"
    B, H = head_indices.shape[0], spec.num_heads
    chosen = (head_indices[:, None, :, :] == torch.arange(H)[None, :, None, None]).any(-1)  # [B, H, Nq]
    q, k, v = inputs(spec, spec.nq, spec.nkv, B, seed)
    out, lse = fwd.forward(q, k, v, head_indices)
    want_out, want_lse = dense_attention(q, k, v, spec)
    assert_close("out", out, want_out * chosen[..., None])
    assert_lse(lse, want_lse.masked_fill(~chosen, float("-inf")))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = bwd.backward(q, k, v, out, lse, dout, head_indices)
    dq, dk, dv = dense_gradients(q, k, v, dout * chosen[..., None], spec)
    for name, got, want in zip(("dq", "dk", "dv"), grads, (dq * chosen[..., None], dk, dv)):
        assert_close(name, got, want)


# -- strategies -----------------------------------------------------------------------------
def seeds():
    return st.integers(0, 2**16)


@st.composite
def lengths_1d(draw, hi: int = 160) -> tuple[int, int]:
    """(nq, nkv): equal half the time, else each anywhere in 1..hi."""
    nq = draw(st.integers(1, hi))
    return nq, draw(st.one_of(st.just(nq), st.integers(1, hi)))


@st.composite
def closed_form_patterns(draw):
    """Patterns on the flattened index whose kv tiles ranges.py writes in closed form."""
    near_tiles = st.sampled_from([15, 16, 17, 31, 32, 33, 63, 64, 65])  # edges where tiles meet
    n, left, right = (draw(st.one_of(st.integers(lo, 48), near_tiles)) for lo in (1, 0, 0))
    kind = draw(st.sampled_from(["causal", "band", "sink", "full", "band&causal", "sink|band&causal",
                                 "sink|causal", "sink|band", "band&band", "causal&sink"]))
    event(f"closed form: {kind}")
    return {"causal": pg.Causal(), "band": pg.Band(left, right), "sink": pg.Sink(n), "full": pg.Full(),
            "band&causal": pg.Band(left) & pg.Causal(), "sink|band&causal": (pg.Sink(n) | pg.Band(left)) & pg.Causal(),
            "sink|causal": pg.Sink(n) | pg.Causal(), "sink|band": pg.Sink(n) | pg.Band(left, right),
            "band&band": pg.Band(left, right) & pg.Band(right, left), "causal&sink": pg.Causal() & pg.Sink(n)}[kind]


@st.composite
def specs_with(draw, pattern, q_shape, kv_shape=None) -> pg.Spec:
    """A Spec of `pattern` with drawn head counts (GQA) and head dim."""
    h, hkv = draw(kernel_head_counts())
    return pg.Spec(pattern, q_shape, kv_shape, num_heads=h, num_kv_heads=hkv, head_dim=draw(kernel_head_dims()))


def flat_tilings():
    return st.builds(pg.Tiling, flat_kernel_tiles(), flat_kernel_tiles())


@st.composite
def box_tilings(draw, q_shape, kv_shape=None) -> pg.Tiling:
    """Box tiles on n-D grids (q and kv drawn apart), flat ones on a 1-D side."""
    kv_shape = q_shape if kv_shape is None else kv_shape
    q = draw(box_kernel_tiles(len(q_shape))) if len(q_shape) > 1 and len(kv_shape) > 1 else draw(flat_kernel_tiles())
    kv = draw(box_kernel_tiles(len(kv_shape))) if len(kv_shape) > 1 and len(q_shape) > 1 else draw(flat_kernel_tiles())
    return pg.Tiling(q, kv)


def grid_shapes(ndim: int, first: int = 2):
    """A 2-D or 3-D grid of at most ~200 tokens, extents >= 2 (the first >= `first`)."""
    hi = {2: 12, 3: 5}[ndim]
    rest = st.lists(st.integers(2, hi), min_size=ndim - 1, max_size=ndim - 1)
    return st.tuples(st.integers(first, hi), rest).map(lambda fr: (fr[0], *fr[1]))


def stride_events(window: pg.Window, ndim: int) -> None:
    """Hypothesis events: each dimension's stride kind (1, even, odd, blocked) and causality."""
    for w, s, _, c in window.dims(ndim):
        kind = "1" if s == 1 else ("blocked" if s == w else ("even" if s % 2 == 0 else "odd"))
        event(f"window stride {kind}{' causal' if c else ''}")


# -- closed form ----------------------------------------------------------------------------
@settings(max_examples=scaled(10), deadline=None)
@given(st.data(), lengths_1d(200), closed_form_patterns(), flat_tilings(), seeds())
def test_closed_form(data, lengths, pattern, tiling, seed):
    """Causal, Band and Sink and their compositions on flat tiles: kv tiles from formulas of
    the q tile and the lengths (bottom-right aligned when nkv != nq)."""
    spec = data.draw(specs_with(pattern, *lengths))
    check_kernels(spec, tiling, "closed_form", seed=seed)


@settings(max_examples=scaled(3), deadline=None)
@given(st.data(), closed_form_patterns(), flat_tilings(), st.lists(lengths_1d(200), min_size=2, max_size=3), seeds())
def test_closed_form_length_free(data, pattern, tiling, lengths, seed):
    """A length-free spec: one kernel for every (nq, nkv), its bounds checked against exact plans."""
    spec = data.draw(specs_with(pattern, None))
    check_kernels(spec, tiling, "closed_form", lengths=lengths, seed=seed)


# -- window ---------------------------------------------------------------------------------
@settings(max_examples=scaled(16), deadline=None)
@given(st.data(), st.integers(1, 200), flat_tilings(), st.booleans(), seeds())
def test_window_1d(data, n, tiling, heads_form, seed):
    """A strided 1-D neighbourhood on flat tiles; `Heads` with one pattern for every head is the
    same single window."""
    window = data.draw(undilated_windows((n,), near=data.draw(st.sampled_from([tiling.q_tile, tiling.kv_tile]))))
    stride_events(window, 1)
    spec = data.draw(specs_with(window, n))
    if heads_form:
        spec = pg.Spec(pg.Heads([window] * spec.num_heads), n, num_heads=spec.num_heads,
                       num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
    check_kernels(spec, tiling, "window", seed=seed)


# window and tile edges one apart: sizes either side of one and two 16-token tiles, every kind
# of stride, causal or not, on a ragged length
EDGE_WINDOWS = [(w, s, c) for w in (15, 16, 17, 31, 32, 33) for s in sorted({1, 2, 3, 4, w}) for c in (False, True)]


@pytest.mark.parametrize("w,s,causal", EDGE_WINDOWS)
def test_window_tile_edges(w, s, causal):
    check_forward(pg.Spec(pg.Window(w, stride=s, causal=causal), 75, head_dim=16), pg.Tiling(16, 16), "window")


@pytest.mark.parametrize("n", [15, 16, 17, 31, 32, 33])
@pytest.mark.parametrize("kind", ["sink", "band", "band&causal"])
def test_closed_form_tile_edges(kind, n):
    """Sinks and band widths one either side of the tiles' edges."""
    pattern = {"sink": pg.Sink(n), "band": pg.Band(n, n), "band&causal": pg.Band(n) & pg.Causal()}[kind]
    check_forward(pg.Spec(pattern, 70, 90, head_dim=16), pg.Tiling(16, 32), "closed_form")


@settings(max_examples=scaled(20), deadline=None)
@given(st.data(), st.integers(18, 130), st.sampled_from([16, 32]), seeds())
def test_window_edges_forward(data, n, tile, seed):
    """Cheap forwards (the window walk is the forward's) with window edges next to tile edges,
    where an off-by-one bound or full-tile test shows: many windows per run."""
    window = data.draw(undilated_windows((n,), near=tile))
    stride_events(window, 1)
    check_forward(pg.Spec(window, n, head_dim=16), pg.Tiling(tile, tile), "window", seed)


@settings(max_examples=scaled(6), deadline=None)
@given(st.data(), st.integers(18, 130), st.sampled_from([16, 32]), seeds())
def test_window_edges_backward(data, n, tile, seed):
    """The same edges through the backward: dQ walks the window on its transposed tiles."""
    window = data.draw(undilated_windows((n,), near=tile))
    stride_events(window, 1)
    check_kernels(pg.Spec(window, n, head_dim=16), pg.Tiling(tile, tile), "window", seed=seed)


@settings(max_examples=scaled(10), deadline=None)
@given(st.data(), st.sampled_from([2, 2, 3]), seeds())
def test_window_nd(data, ndim, seed):
    """2-D and 3-D generalized neighbourhoods (strides and causality per dimension) on box tiles,
    q and kv boxes drawn apart."""
    shape = data.draw(grid_shapes(ndim))
    window = data.draw(undilated_windows(shape))
    stride_events(window, ndim)
    spec = data.draw(specs_with(window, shape))
    check_kernels(spec, data.draw(box_tilings(shape)), "window", seed=seed)


# -- table ----------------------------------------------------------------------------------
@st.composite
def dilated_windows(draw, shape: tuple[int, ...]) -> pg.Window:
    """A Window with dilation > 1 along the first dimension (extent >= 4), any along the others."""
    dims = [draw(window_dims(L)) for L in shape]
    L = shape[0]
    d = draw(st.integers(2, L // 2))
    w = draw(st.integers(2, L // d))
    dims[0] = (w, draw(window_strides(w)), d, draw(st.booleans()))
    size, stride, dilation, causal = zip(*dims)
    return pg.Window(size, stride, dilation, causal)


@st.composite
def flat_index_patterns(draw, nkv: int):
    """Patterns on the flattened index the closed form does not cover: Strided (various strides
    and offsets) and Global, alone or with Band, Causal and Sink."""
    s = draw(st.integers(2, 12))
    strided = pg.Strided(s, draw(st.integers(0, s - 1)))
    glob = pg.Global(draw(st.integers(1, max(1, nkv // 2))))
    band = pg.Band(draw(st.integers(0, 24)), draw(st.integers(0, 24)))
    sink = pg.Sink(draw(st.integers(1, 8)))
    kind = draw(st.sampled_from(["strided", "strided|causal", "strided&band", "(strided|sink)&causal",
                                 "global", "global|band", "global&causal", "strided|global"]))
    event(f"table: {kind}")
    return {"strided": strided, "strided|causal": strided | pg.Causal(), "strided&band": strided & band,
            "(strided|sink)&causal": (strided | sink) & pg.Causal(), "global": glob, "global|band": glob | band,
            "global&causal": glob & pg.Causal(), "strided|global": strided | glob}[kind]


@st.composite
def table_cases(draw, kind: str) -> tuple[pg.Spec, pg.Tiling]:
    """(spec, tiling) whose forward walks the index table, by what sends it there."""
    ndim = draw(st.sampled_from([1, 2, 3]))
    shape = (draw(st.integers(4, 160)),) if ndim == 1 else draw(grid_shapes(ndim, first=4))
    n = math.prod(shape)
    if kind == "dilated":
        return draw(specs_with(draw(dilated_windows(shape)), shape)), draw(box_tilings(shape))
    if kind == "flat index":  # 1-D, kv length != q length
        nq, nkv = draw(lengths_1d())
        return draw(specs_with(draw(flat_index_patterns(nkv)), nq, nkv)), draw(flat_tilings())
    if kind == "windows":  # a window in a composition, or an n-D window on flat tiles
        a, b = draw(undilated_windows(shape)), draw(dilated_windows(shape))
        band = pg.Band(draw(st.integers(0, 20)), draw(st.integers(0, 20)))
        pattern = draw(st.sampled_from([a | b, a & pg.Causal(), a | band, (a | pg.Sink(3)) & pg.Causal(),
                                        a & pg.Strided(2, 1)] + ([a] if ndim > 1 else [])))
        tiling = draw(st.one_of(flat_tilings(), box_tilings(shape)) if ndim > 1 else flat_tilings())
        if pattern is a and isinstance(tiling.q_tile, tuple):
            tiling = draw(flat_tilings())
        return draw(specs_with(pattern, shape)), tiling
    if kind == "grids":  # the kv grid is not the q grid: other extents, perhaps another rank
        q_shape = shape if ndim > 1 else draw(grid_shapes(2))
        kv_shape = draw(st.one_of(grid_shapes(2), grid_shapes(3), st.integers(1, 160).map(lambda m: (m,))))
        if kv_shape == q_shape:
            kv_shape = (kv_shape[0] + 1, *kv_shape[1:])
        pattern = flat_index_patterns(math.prod(kv_shape))
        if len(kv_shape) > 1:  # box tiles on both sides: no closed form even for Causal or Band
            pattern = st.one_of(pattern, st.sampled_from([pg.Causal(), pg.Band(7, 2), pg.Sink(5) | pg.Causal()]))
        return draw(specs_with(draw(pattern), q_shape, kv_shape)), draw(box_tilings(q_shape, kv_shape))
    # "heads": several head groups, each its own mask function and plan
    h, hkv = draw(st.sampled_from([(2, 1), (2, 2), (4, 2), (3, 1)]))
    options = [pg.Causal(), pg.Full(), pg.Band(draw(st.integers(0, 20))) & pg.Causal(),
               draw(undilated_windows(shape)), draw(flat_index_patterns(n))]
    first, second = draw(st.permutations(options))[:2]  # two groups at least
    patterns = [first, second] + draw(st.lists(st.sampled_from(options), min_size=h - 2, max_size=h - 2))
    spec = pg.Spec(pg.Heads(patterns), shape, num_heads=h, num_kv_heads=hkv, head_dim=draw(kernel_head_dims()))
    return spec, draw(st.one_of(flat_tilings(), box_tilings(shape)) if ndim > 1 else flat_tilings())


TABLE_KINDS = ["dilated", "flat index", "windows", "grids", "heads"]


@pytest.mark.parametrize("kind", TABLE_KINDS)
@settings(max_examples=scaled(4), deadline=None)
@given(data=st.data(), seed=seeds())
def test_table(kind, data, seed):
    """Specs the closed forms do not cover walk the plan's index table."""
    spec, tiling = data.draw(table_cases(kind))
    check_kernels(spec, tiling, "table", seed=seed)


@settings(max_examples=scaled(4), deadline=None)
@given(st.data(), flat_tilings(), st.lists(lengths_1d(), min_size=2, max_size=3), seeds())
def test_table_length_free(data, tiling, lengths, seed):
    """A length-free table walk: the tables of each call's lengths, one kernel."""
    pattern = data.draw(st.one_of(flat_index_patterns(8),
                                  st.just(pg.Heads([pg.Causal(), pg.Strided(3, 2) | pg.Sink(2)]))))
    h, hkv = (2, 1) if isinstance(pattern, pg.Heads) else data.draw(kernel_head_counts())
    spec = pg.Spec(pattern, num_heads=h, num_kv_heads=hkv, head_dim=data.draw(kernel_head_dims()))
    check_kernels(spec, tiling, "table", lengths=lengths, seed=seed)


# -- routed ---------------------------------------------------------------------------------
def random_block_indices(spec: pg.Spec, batch: int, topk: int, seed: int) -> torch.Tensor:
    """[B, Hkv, q blocks, topk] indices into the key blocks, with repeats and unused (-1) slots."""
    g = torch.Generator().manual_seed(seed)
    r = spec.routed
    shape = (batch, spec.num_kv_heads, -(-spec.nq // r.block), topk)
    idx = torch.randint(0, -(-spec.nkv // r.block), shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 0.25, -1, idx)


@st.composite
def routed_specs(draw) -> pg.Spec:
    """Routed blocks (topk, causal) alone, with a static part, or on some heads."""
    block = draw(st.sampled_from([16, 16, 32, 64]))
    nq, nkv = draw(lengths_1d(112))
    routed = pg.Routed(block, draw(st.integers(1, min(4, -(-nkv // block)))), causal=draw(st.booleans()))
    static = draw(st.sampled_from([pg.Band(9) & pg.Causal(), pg.Sink(3), pg.Strided(5, 1), pg.Causal()]))
    form = draw(st.sampled_from(["alone", "static", "heads"]))
    event(f"routed: {form}{' causal' if routed.causal else ''}")
    if form == "heads":
        return pg.Spec(pg.Heads([routed | static, static, routed, pg.Full()]), nq, nkv, num_heads=4, num_kv_heads=2,
                       head_dim=draw(kernel_head_dims()))
    return draw(specs_with(routed if form == "alone" else routed | static, nq, nkv))


@settings(max_examples=scaled(10), deadline=None)
@given(st.data(), routed_specs(), st.integers(1, 2), seeds())
def test_routed(data, spec, batch, seed):
    """Run-time blocks per (batch, kv head, q block), repeats and -1 slots included; tiles of the
    block or smaller (a block walked as several tiles)."""
    r = spec.routed
    tiles = st.sampled_from([t for t in (16, 32, 64) if r.block % t == 0])
    check_kernels(spec, pg.Tiling(data.draw(tiles), data.draw(tiles)), "routed", batch=batch, seed=seed,
                  indices=lambda bound, b: random_block_indices(bound, b, r.topk, seed))


# -- head-routed ----------------------------------------------------------------------------
@st.composite
def head_routed_cases(draw, walk: str):
    """(spec, tiling, head_indices [B, Nq, k]) for head-routed kernels walking `walk`."""
    ndim = draw(st.sampled_from([1, 1, 2]))
    shape = (draw(st.integers(2, 120)),) if ndim == 1 else draw(grid_shapes(2))
    window = draw(undilated_windows(shape))
    h, hkv = draw(kernel_head_counts())
    if walk == "window":
        pattern, tiling = window, draw(box_tilings(shape))
    else:
        pattern = draw(st.sampled_from([pg.Causal(), (pg.Sink(3) | pg.Band(20)) & pg.Causal(), pg.Strided(3, 1),
                                        pg.Heads([[pg.Causal(), window][i % 2] for i in range(h)])]))
        tiling = draw(flat_tilings() if ndim == 1 else box_tilings(shape))
    spec = pg.Spec(pattern, shape, num_heads=h, num_kv_heads=hkv, head_dim=draw(kernel_head_dims()))
    H = spec.num_heads
    g = torch.Generator().manual_seed(draw(seeds()))
    idx = torch.randint(-1, H, (draw(st.integers(1, 2)), spec.nq, draw(st.integers(1, 2))), generator=g)
    return spec, tiling, idx


@pytest.mark.parametrize("walk", ["window", "tile_union"])
@settings(max_examples=scaled(6), deadline=None)
@given(data=st.data(), seed=seeds())
def test_head_routed(walk, data, seed):
    spec, tiling, idx = data.draw(head_routed_cases(walk))
    check_head_routed(spec, tiling, walk, idx, seed)


# -- edge cases -----------------------------------------------------------------------------
EDGE_CASES = [
    # (id, spec, tiling, walk, batch)
    ("window 7 stride 6 on 73", pg.Spec(pg.Window(7, stride=6), 73, head_dim=16), pg.Tiling(16, 16), "window", 2),
    ("window 10 stride 4 on 150", pg.Spec(pg.Window(10, stride=4), 150, num_heads=2, head_dim=48),
     pg.Tiling(16, 32), "window", 1),
    ("blocked window 8 on 100", pg.Spec(pg.Window(8, stride=8), 100, head_dim=64), pg.Tiling(32, 16), "window", 1),
    ("causal window 9 stride 4 on 70", pg.Spec(pg.Window(9, stride=4, causal=True), 70, head_dim=16),
     pg.Tiling(16, 16), "window", 1),
    ("3-D GNA strided", pg.Spec(pg.Window((3, 4, 5), stride=(2, 2, 3), causal=(True, False, False)), (4, 5, 7),
                                head_dim=32), pg.Tiling((1, 2, 8), (2, 2, 4)), "window", 1),
    ("window head dim 256 tiles 128", pg.Spec(pg.Window(33, stride=6), 200, head_dim=256), pg.Tiling(128, 128),
     "window", 1),
    ("dilated 2-D", pg.Spec(pg.Window((3, 4), stride=(2, 1), dilation=(2, 3)), (8, 13), head_dim=16),
     pg.Tiling((4, 4), (4, 4)), "table", 1),
    ("causal nq > nkv: empty rows", pg.Spec(pg.Causal(), 50, 20, head_dim=16), pg.Tiling(16, 16), "closed_form", 2),
    ("band one query", pg.Spec(pg.Band(3, 40), 1, 90, head_dim=16), pg.Tiling(16, 32), "closed_form", 1),
    ("sinks + window GQA 4:2 tiles 128", pg.Spec((pg.Sink(4) | pg.Band(60)) & pg.Causal(), 200, num_heads=4,
                                                 num_kv_heads=2, head_dim=80), pg.Tiling(128, 64), "closed_form", 1),
    ("strided heads GQA 4:2", pg.Spec(pg.Heads([pg.Strided(4, 3), pg.Causal(), pg.Strided(7, 0), pg.Causal()]), 60,
                                      num_heads=4, num_kv_heads=2, head_dim=24), pg.Tiling(16, 16), "table", 2),
]


@pytest.mark.parametrize("spec,tiling,walk,batch", [c[1:] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_edge_cases(spec, tiling, walk, batch):
    check_kernels(spec, tiling, walk, batch=batch)


def test_routed_causal_bottom_right():
    """A causal routed block with nkv > nq: the diagonal sits `nkv - nq` keys to the right."""
    spec = pg.Spec(pg.Routed(16, 2, causal=True) | pg.Sink(2), 40, 70, num_heads=4, num_kv_heads=2, head_dim=32)
    check_kernels(spec, pg.Tiling(16, 16), "routed", batch=2,
                  indices=lambda bound, b: torch.tensor([[[2, 4], [3, -1], [1, 4]]] * 2).expand(b, 2, 3, 2))


def test_head_routed_strided_window():
    spec = pg.Spec(pg.Window(10, stride=4), 77, num_heads=4, num_kv_heads=2, head_dim=16)
    idx = torch.randint(-1, 4, (2, 77, 2), generator=torch.Generator().manual_seed(0))
    check_head_routed(spec, pg.Tiling(16, 16), "window", idx, seed=0)


def test_head_routed_group_that_sees_nothing():
    """A head group whose plan is empty (no key visible) gets zeros, not an IndexError in
    tables._runs (found by this file)."""
    spec = pg.Spec(pg.Strided(3, 1), 1, head_dim=16)
    check_head_routed(spec, pg.Tiling(16, 16), "tile_union", torch.tensor([[[0]]]), seed=0)


# -- int64 token offsets ----------------------------------------------------------------------
def test_int64_offsets_only_where_int32_could_overflow():
    """Kernels multiply a tile's first token by the token stride in int32 unless some tensor's
    offsets along the tokens reach 2**31 elements (the launcher's INT64_OFFSETS)."""
    from types import SimpleNamespace

    from patterngen.backends.triton.launch import int64_offsets

    def tensor(n, stride):
        return SimpleNamespace(shape=(1, 8, n, 128), stride=lambda dim: (0, 0, stride, 1)[dim])
    assert not int64_offsets(tensor(1 << 20, 128), tensor(1 << 16, 8 * 128))  # 1M tokens, BHND
    assert int64_offsets(tensor(1 << 20, 128), tensor(1 << 20, 32 * 128))  # 1M tokens, BNHD with 32 heads
    assert int64_offsets(tensor((1 << 31) // 128 - 200, 128))  # within a tile of the limit


INT64_CASES = [EDGE_CASES[i] for i in (1, 4, 9)]


@pytest.mark.parametrize("spec,tiling,walk,batch", [c[1:] for c in INT64_CASES], ids=[c[0] for c in INT64_CASES])
def test_int64_offsets_variant(monkeypatch, spec, tiling, walk, batch):
    """The variant the largest inputs compile (INT64_OFFSETS) computes the same, whatever the walk."""
    from patterngen.backends.triton import heads, launch
    monkeypatch.setattr(launch, "int64_offsets", lambda *tensors: True)
    monkeypatch.setattr(heads, "int64_offsets", lambda *tensors: True)
    check_kernels(spec, tiling, walk, batch=batch)
    if walk == "window":
        idx = torch.randint(-1, spec.num_heads, (1, spec.nq, 2), generator=torch.Generator().manual_seed(1))
        check_head_routed(spec, tiling, walk, idx, seed=1)

"""The one tiling policy (patterngen.analysis.tiling): every default is a tiling the
generated kernels can run, plans default to it, and the simulator-ranked choice only
ever offers kernel-runnable tilings."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.analysis.tiling import default_box, default_tiling, kernel_tile_ok, kernel_tilings
from patterngen.sim import ranked_kernel_tilings
from tests.strategies import routed_specs, scaled, shapes, specs


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


@settings(max_examples=scaled(60), deadline=None)
@given(st.one_of(specs(), routed_specs().map(lambda spec_and_indices: spec_and_indices[0])))
def test_default_is_kernel_runnable_and_plans_use_it(spec):
    tiling = default_tiling(spec)
    assert kernel_tile_ok(tiling.q_tile) and kernel_tile_ok(tiling.kv_tile)
    if spec.routed is not None and kernel_tile_ok(spec.routed.block):
        assert tiling == pg.Tiling(spec.routed.block, spec.routed.block)  # a selected block is one kv tile
    if spec.routed is None:
        assert pg.build_plan(spec).tiling == tiling


@settings(max_examples=scaled(100), deadline=None)
@given(shapes(), st.sampled_from([16, 32, 64, 128]))
def test_default_box_sides(shape, tokens):
    box = default_box(shape, tokens)
    assert len(box) == len(shape)
    assert all(_pow2(t) for t in box) and math.prod(box) <= tokens
    # a side never exceeds its extent rounded up to a power of two, and only the first exceeds 8
    assert all(t <= max(1, 1 << (n - 1).bit_length()) for t, n in zip(box, shape))
    assert all(t <= 8 for t in box[1:])


def test_kernel_tilings_filter_and_fall_back():
    spec = pg.Spec(pg.Causal(), 512)
    ranked = [pg.Tiling(48, 64), pg.Tiling(128, 64), pg.Tiling((3, 5), 64), pg.Tiling(128, 64), pg.Tiling(32, 32)]
    assert kernel_tilings(spec, ranked) == [pg.Tiling(128, 64), pg.Tiling(32, 32)]
    assert kernel_tilings(spec, ranked, limit=1) == [pg.Tiling(128, 64)]
    assert kernel_tilings(spec, [pg.Tiling(48, 64)]) == [default_tiling(spec)]
    routed = pg.Spec(pg.Routed(32, 2), 256)
    assert kernel_tilings(routed, ranked) == [pg.Tiling(32, 32)]
    assert not kernel_tile_ok(8) and not kernel_tile_ok((4, 6)) and kernel_tile_ok((4, 4)) and kernel_tile_ok(16)


def test_ranked_kernel_tilings_come_from_the_simulator():
    spec = pg.Spec(pg.Window((7, 7)), (32, 32))
    got = ranked_kernel_tilings(spec)
    assert got and all(kernel_tile_ok(t.q_tile) and kernel_tile_ok(t.kv_tile) for t in got)
    ranked = [pg.Tiling(c.q_tile, c.kv_tile) for c in pg.simulate(spec, device="h100").candidates]
    assert got[0] == next(t for t in ranked if kernel_tile_ok(t.q_tile) and kernel_tile_ok(t.kv_tile))
    assert ranked_kernel_tilings(pg.Spec(pg.Causal(), 0)) == [default_tiling(pg.Spec(pg.Causal(), 0))]

"""The tile plan against brute force: every (q tile, kv tile) pair of every head is
classified exactly as the dense oracle's mask over the tiles' tokens says.

The brute force counts visible pairs per tile pair with a membership-matrix
product (tile of each token, computed here from coordinates), so it shares no
code with the analysis beyond `dense_mask`.
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.helpers import check_plan
from tests.strategies import complementary, grids, routed_specs, scaled, specs, specs_and_tilings, tilings

# -- properties ---------------------------------------------------------------------
@settings(max_examples=scaled(200))
@given(specs_and_tilings())
def test_plan_matches_brute_force(case):
    check_plan(*case)


@settings(max_examples=scaled(80))
@given(st.data())
def test_plan_matches_brute_force_nd_boxes(data):
    """n-D grids with box tiles, where the Window analysis works per dimension."""
    spec = data.draw(specs(ndim=data.draw(st.sampled_from([2, 3]))))
    check_plan(spec, data.draw(tilings(spec.q_shape, spec.kv_shape, box=True)))


@settings(max_examples=scaled(80))
@given(st.data())
def test_refinement_cases(data):
    """Compositions of parts partial on the same tiles (union full, intersection empty)."""
    q_shape, kv_shape, same = data.draw(grids())
    pattern = data.draw(complementary(q_shape, kv_shape, window=same))
    spec = pg.Spec(pattern, q_shape, kv_shape)
    check_plan(spec, data.draw(tilings(q_shape, kv_shape)))


@settings(max_examples=scaled(120))
@given(routed_specs(), st.data())
def test_routed_plan_matches_brute_force(case, data):
    spec, indices = case
    check_plan(spec, data.draw(tilings(spec.q_shape, spec.kv_shape, box=False)), indices)


# -- hand-picked cases ------------------------------------------------------------------
def test_causal_bottom_right_alignment():
    # 5 queries, 9 keys: query i sees keys 0..i+4
    spec = pg.Spec(pg.Causal(), 5, kv_shape=9)
    plan = check_plan(spec, pg.Tiling(2, 3))
    qt, kt, full = plan.head_plan(0).pairs()
    got = {(int(a), int(b)): bool(f) for a, b, f in zip(qt, kt, full)}
    # q tile 0 = queries 0,1 -> keys <= 4, 5; q tile 2 = query 4 -> keys <= 8
    assert got == {(0, 0): True, (0, 1): False, (1, 0): True, (1, 1): True, (1, 2): False,
                   (2, 0): True, (2, 1): True, (2, 2): True}
    # more queries than keys: the first queries see nothing
    spec = pg.Spec(pg.Causal(), 9, kv_shape=5)
    plan = check_plan(spec, pg.Tiling(2, 2))
    q_ptr = plan.head_plan(0).q_ptr
    assert int(q_ptr[2]) == 0 and int(q_ptr[3]) == 1  # queries 0..3 see no key (kv <= q - 4)


def test_band_bottom_right_alignment():
    check_plan(pg.Spec(pg.Band(2, 1), 7, kv_shape=20), pg.Tiling(3, 4))
    check_plan(pg.Spec(pg.Band(0, 3) | pg.Causal(), 20, kv_shape=7), pg.Tiling(3, 2))


@pytest.mark.parametrize("tiling", [pg.Tiling(8, 8), pg.Tiling(5, 3), pg.Tiling(1, 16)])
def test_union_of_partials_is_full(tiling):
    spec = pg.Spec(pg.Causal() | pg.Band(0, 1000), 37)
    plan = check_plan(spec, tiling)
    c = plan.counts()
    assert c["full"] == c["tile_pairs"] and c["partial"] == 0


def test_union_of_partials_is_full_on_boxes():
    spec = pg.Spec(pg.Window((3, 3)) | pg.Causal() | pg.Band(0, 1000), (6, 7))
    plan = check_plan(spec, pg.Tiling((2, 3), (3, 2)))
    c = plan.counts()
    assert c["full"] == c["tile_pairs"]


@pytest.mark.parametrize("tiling", [pg.Tiling(4, 4), pg.Tiling(3, 5), pg.Tiling((2, 2), (2, 3))])
def test_intersection_of_partials_is_empty(tiling):
    # depends on the key alone: every kv tile holds both even and odd keys
    spec = pg.Spec(pg.Strided(2, 0) & pg.Strided(2, 1), (4, 6))
    plan = check_plan(spec, tiling)
    assert plan.counts()["visited"] == 0
    spec = pg.Spec(pg.Strided(2, 0) | pg.Strided(2, 1), (4, 6))
    plan = check_plan(spec, tiling)
    assert plan.counts()["partial"] == 0


@pytest.mark.parametrize("tiling", [pg.Tiling(7, 5), pg.Tiling(12, 12), pg.Tiling(1, 3), pg.Tiling(16, 1)])
def test_window_on_flat_tiles_of_a_2d_grid(tiling):
    for window in [pg.Window((3, 5)), pg.Window((3, 5), stride=(1, 2), dilation=(2, 1)),
                   pg.Window((4, 4), stride=(4, 2), causal=(True, False)), pg.Window((9, 2), dilation=(1, 3))]:
        check_plan(pg.Spec(window, (9, 12)), tiling)


def test_window_3d_boxes_fully_block_sparse():
    # stride == window == tile: every visited tile pair is full
    spec = pg.Spec(pg.Window((2, 4, 3), stride=(2, 4, 3)), (4, 8, 6))
    plan = check_plan(spec, pg.Tiling((2, 4, 3), (2, 4, 3)))
    c = plan.counts()
    assert c["partial"] == 0 and c["visited"] == plan.q_grid.count


def test_default_tiling():
    plan = check_plan(pg.Spec(pg.Causal() | pg.Sink(3), 150, num_heads=2), None)
    assert plan.tiling == pg.Tiling(64, 64)


def test_heads_share_plans():
    spec = pg.Spec(pg.Heads({range(0, 4, 2): pg.Causal(), range(1, 4, 2): pg.Band(3)}), 40, num_heads=4)
    plan = check_plan(spec, pg.Tiling(8, 8))
    assert len(plan.groups) == 2
    assert plan.head_group.tolist() == [[0, 1, 0, 1]]


def test_routed_duplicates_and_unused_slots():
    spec = pg.Spec(pg.Routed(4, 3) | pg.Band(1), 16, num_heads=2, num_kv_heads=1)
    idx = torch.tensor([[[0, 0, -1], [3, -1, -1], [-1, -1, -1], [2, 1, 2]]])  # [Hkv, q blocks, k]
    plan = check_plan(spec, pg.Tiling(4, 4), idx)
    qt, kt, full = plan.head_plan(1).pairs()
    got = {(int(a), int(b)): bool(f) for a, b, f in zip(qt, kt, full)}
    # block pairs selected are full; the band adds partial pairs next to the diagonal
    assert got == {(0, 0): True, (1, 0): False, (1, 1): False, (1, 3): True, (2, 1): False, (2, 2): False,
                   (3, 1): True, (3, 2): True, (3, 3): False}
    batched = torch.stack([idx, torch.full_like(idx, -1)])
    plan = check_plan(spec, pg.Tiling(8, 2), batched)
    assert plan.head_group.shape == (2, 2)


def test_routed_causal_and_unaligned_tiles():
    spec = pg.Spec(pg.Routed(5, 2, causal=True), 23, kv_shape=31)
    idx = torch.tensor([[[0, 6], [1, 1], [-1, 3], [4, 5], [6, 2]]])
    check_plan(spec, pg.Tiling(3, 7), idx)
    check_plan(spec, pg.Tiling(16, 1), idx)

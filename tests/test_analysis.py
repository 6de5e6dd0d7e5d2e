"""The tile plan against brute force: every (q tile, kv tile) pair of every head is
classified exactly as the dense oracle's mask over the tiles' tokens says.

The brute force counts visible pairs per tile pair with a membership-matrix
product (tile of each token, computed here from coordinates), so it shares no
code with the analysis beyond `dense_mask`.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import currently_in_test_context, given, note, settings
from hypothesis import strategies as st

import patterngen as pg
from strategies import complementary, grids, routed_specs, scaled, specs, specs_and_tilings, tilings

EMPTY, PARTIAL, FULL = 0, 1, 2


def tile_of_token(shape: tuple[int, ...], tile) -> torch.Tensor:
    """Tile id of every flattened token, straight from the definition of a tiling."""
    n = math.prod(shape)
    t = torch.arange(n)
    if isinstance(tile, int):
        return t // tile
    tile = tuple(tile)
    counts = [-(-L // s) for L, s in zip(shape, tile)]
    coords = []
    for L in reversed(shape):
        coords.append(t % L)
        t = t // L
    coords = coords[::-1]
    out = torch.zeros(n, dtype=torch.long)
    for c, s, cnt in zip(coords, tile, counts):
        out = out * cnt + c // s
    return out


def membership(grid: pg.TileGrid) -> torch.Tensor:
    """[N, count] one-hot of each token's tile, from TileGrid.tokens, after checking
    that tokens() partitions the grid the way the tiling's definition says."""
    tok = grid.tokens(torch.arange(grid.count))
    assert tok.shape == (grid.count, grid.volume)
    tiles = torch.arange(grid.count)[:, None].expand_as(tok)
    valid = tok >= 0
    n = math.prod(grid.shape)
    assert int(valid.sum()) == n, "tiles must cover every token exactly once"
    owner = torch.full((n,), -1, dtype=torch.long)
    owner[tok[valid]] = tiles[valid]
    assert torch.equal(owner, tile_of_token(grid.shape, grid.tile))
    assert torch.equal(grid.sizes, valid.sum(1))
    onehot = torch.zeros(n, grid.count, dtype=torch.float64)
    onehot[torch.arange(n), owner] = 1.0
    return onehot


def brute_status(mask: torch.Tensor, aq: torch.Tensor, ak: torch.Tensor) -> torch.Tensor:
    """[Tq, Tk] EMPTY/PARTIAL/FULL of a dense [Nq, Nkv] mask."""
    visible = aq.T @ mask.double() @ ak
    pairs = aq.sum(0)[:, None] * ak.sum(0)[None, :]
    return torch.where(visible == pairs, FULL, torch.where(visible > 0, PARTIAL, EMPTY))


def plan_status(tp, tq: int, tk: int) -> torch.Tensor:
    """[Tq, Tk] status of one TilePlan, after checking its CSR structure."""
    assert tp.q_ptr.shape == (tq + 1,)
    assert int(tp.q_ptr[0]) == 0 and int(tp.q_ptr[-1]) == len(tp.kv_tiles) == len(tp.full)
    assert bool((tp.q_ptr.diff() >= 0).all())
    rows = torch.repeat_interleave(torch.arange(tq), tp.q_ptr.diff())
    same_row = rows[1:] == rows[:-1]
    bad = same_row & (tp.kv_tiles.diff() <= 0)  # ascending, each kv tile at most once per q tile
    assert not bool(bad.any()), f"q tile {int(rows[1:][bad][0])}: kv tiles not strictly ascending"
    if len(tp.kv_tiles):
        assert 0 <= int(tp.kv_tiles.min()) and int(tp.kv_tiles.max()) < tk
    qt, kt, full = tp.pairs()
    out = torch.full((tq, tk), EMPTY, dtype=torch.long)
    out[qt, kt] = torch.where(full, FULL, PARTIAL)
    assert tp.visited == len(qt) and tp.num_full == int(full.sum()) and tp.num_partial == int((~full).sum())
    return out


def check_plan(spec: pg.Spec, tiling: pg.Tiling | None, indices: torch.Tensor | None = None) -> pg.Plan:
    """Build the plan and compare every head (and batch) with brute force; returns the plan."""
    if currently_in_test_context():
        note(f"spec={spec!r} tiling={tiling!r}")
        if indices is not None:
            note(f"block_indices={indices.tolist()}")
    plan = pg.build_plan(spec, tiling, indices)
    mask = pg.dense_mask(spec, indices)
    if mask.dim() == 3:
        mask = mask[None]
    qg, kg = plan.q_grid, plan.kv_grid
    aq, ak = membership(qg), membership(kg)
    assert plan.total_pairs == qg.count * kg.count
    rows = plan.head_group.shape[0]
    assert rows == (mask.shape[0] if indices is not None else 1)
    assert plan.head_group.shape[1] == spec.num_heads
    totals = {"visited": 0, "full": 0, "partial": 0}
    for b in range(rows):
        for h in range(spec.num_heads):
            want = brute_status(mask[b, h], aq, ak)
            got = plan_status(plan.head_plan(h, b), qg.count, kg.count)
            if not torch.equal(got, want):
                bad = torch.nonzero(got != want)[:5].tolist()
                detail = [(q, k, int(got[q, k]), int(want[q, k])) for q, k in bad]
                raise AssertionError(f"{spec!r} {tiling!r} batch {b} head {h}: "
                                     f"(q tile, kv tile, plan, brute) = {detail}")
            totals["visited"] += int((want != EMPTY).sum())
            totals["full"] += int((want == FULL).sum())
            totals["partial"] += int((want == PARTIAL).sum())
    counts = plan.counts()
    total = plan.total_pairs * rows * spec.num_heads
    assert counts == {"tile_pairs": total, **totals, "empty": total - totals["visited"]}
    return plan


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

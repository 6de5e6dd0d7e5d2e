"""`pg.distributed.plan` (issue 15 item 2): the keys each rank of a sequence-sharded attention
receives. Oracle: the dense mask. Every key a rank's queries see is its own or received
(complete), and every received kv tile holds a pair its queries see (nothing moved for naught,
up to the tile)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import patterns, scaled


def check(spec: pg.Spec, world: int, tiling: pg.Tiling, layout: str = "contiguous") -> pg.distributed.DistributedPlan:
    p = pg.distributed.plan(spec, world, tiling, layout)
    mask = pg.dense_mask(spec).any(0)  # [Nq, Nkv], any head
    kg = pg.TileGrid(spec.kv_shape, tiling.kv_tile)
    tile_of = torch.empty(spec.nkv, dtype=torch.long)
    tok = kg.tokens(torch.arange(kg.count))
    for t in range(kg.count):
        tile_of[tok[t][tok[t] >= 0]] = t
    for r in range(world):
        seen = mask[p.held(r, "q")].any(0)
        have = p.needed(r)
        assert not (seen & ~have).any(), f"rank {r} misses keys {(seen & ~have).nonzero().flatten().tolist()}"
        received = have.clone()
        received[p.held(r)] = False
        tiles = tile_of[received].unique()
        useful = torch.zeros(kg.count, dtype=torch.bool)
        useful[tile_of[seen]] = True
        assert useful[tiles].all(), f"rank {r} receives tiles {tiles[~useful[tiles]].tolist()} it never reads"
        assert p.received_tokens[r] == int(received.sum())
    held = torch.zeros(spec.nq, dtype=torch.long)
    for r in range(world):  # the shards partition the tokens, and each rank computes its own q tiles
        held[p.held(r, "q")] += 1
        assert set(qg_tokens(p, p.q_tiles(r))) == set(p.held(r, "q").tolist())
    assert (held == 1).all()
    for rnd in p.rounds:  # no rank sends or receives twice in a round; every transfer in one round
        assert len({t.src for t in rnd}) == len(rnd) == len({t.dst for t in rnd})
    degree = max([sum(t.src == r for t in p.transfers) for r in range(world)]
                 + [sum(t.dst == r for t in p.transfers) for r in range(world)])
    assert degree <= len(p.rounds) <= max(2 * degree - 1, 0), (degree, len(p.rounds))  # greedy's bound
    assert sorted(((t.src, t.dst) for rnd in p.rounds for t in rnd)) == sorted((t.src, t.dst) for t in p.transfers)
    return p


def qg_tokens(p, tiles) -> list[int]:
    tok = p.tile_plan.q_grid.tokens(tiles).flatten()
    return tok[tok >= 0].tolist()


@settings(max_examples=scaled(25), deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.integers(1, 4), st.sampled_from(pg.distributed.LAYOUTS), st.data())
def test_1d_plans_receive_exactly_the_tiles_read(world, tiles_per_shard, layout, data):
    n = 2 * world * tiles_per_shard * 16
    pattern = data.draw(patterns((n,), (n,), window=False))
    check(pg.Spec(pattern, n, num_heads=2, head_dim=16), world, pg.Tiling(16, 16), layout)


@settings(max_examples=scaled(15), deadline=None)
@given(st.sampled_from([2, 4]), st.integers(1, 3), st.integers(4, 12), st.data())
def test_grid_slabs_receive_exactly_the_tiles_read(world, rows_per_shard, width, data):
    shape = (world * rows_per_shard * 2, width)
    pattern = data.draw(patterns(shape, shape))
    check(pg.Spec(pattern, shape, num_heads=1, head_dim=16), world, pg.Tiling((2, 4), (2, 4)))


def test_band_receives_its_width_from_the_left_neighbour_only():
    """Band(300) & Causal() on 4 ranks of 2048 tokens: 300 keys rounded up to 64-key tiles (320),
    from the left neighbour; dense ring attention would move 3 shards (6144 keys) to every rank."""
    spec = pg.Spec(pg.Band(300) & pg.Causal(), 8192, num_heads=2, head_dim=64)
    p = check(spec, 4, pg.Tiling(64, 64))
    assert p.received_tokens == (0, 320, 320, 320)
    assert all(t.src == t.dst - 1 for t in p.transfers)
    assert pg.distributed.ring_tokens(spec, 4) == 6144


def test_video_window_receives_a_halo_of_frames():
    """A 3-frame window over 16 frames of 16 x 16 on 4 ranks: one frame from each neighbour."""
    spec = pg.Spec(pg.Window((3, 5, 5)), (16, 16, 16), num_heads=1, head_dim=16)
    p = check(spec, 4, pg.Tiling((1, 8, 8), (1, 8, 8)))
    frame = 16 * 16
    assert p.received_tokens == (frame, 2 * frame, 2 * frame, frame)
    assert p.received_from(1) == {0: ((3 * frame, 4 * frame),), 2: ((8 * frame, 9 * frame),)}


def test_zigzag_balances_causal_work():
    """Causal attention on 4 ranks: contiguous shards leave the last rank 7x the first's tile
    pairs; zig-zag chunks (r and 7 - r of 8) give every rank the same share."""
    spec = pg.Spec(pg.Causal(), 1024, num_heads=2, head_dim=16)
    flat = check(spec, 4, pg.Tiling(64, 64))
    zig = check(spec, 4, pg.Tiling(64, 64), "zigzag")
    work = [flat.visited_pairs(r) for r in range(4)]
    assert work == [2 * 10, 2 * 26, 2 * 42, 2 * 58]  # tiles 4r..4r+3 visit 4r+1..4r+4 kv tiles each
    assert [zig.visited_pairs(r) for r in range(4)] == [sum(work) // 4] * 4
    assert sum(zig.visited_pairs(r) for r in range(4)) == sum(work)
    assert zig.q_shards[1] == ((128, 256), (768, 896))


def test_rounds_reach_the_most_messages_of_a_rank():
    """A strided window on 4 ranks: ranks 1 and 2 send three messages each, so three rounds (a
    largest-first greedy colouring alone takes four)."""
    spec = pg.Spec(pg.Window((6, 8, 8), stride=(4, 4, 4)), (8, 16, 16), num_heads=1, head_dim=16)
    p = check(spec, 4, pg.Tiling((1, 8, 8), (1, 8, 8)))
    assert sorted((t.src, t.dst) for t in p.transfers) == [(0, 1), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (2, 3),
                                                          (3, 2)]
    assert len(p.rounds) == 3


def test_bad_input():
    causal = pg.Spec(pg.Causal(), 96, num_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="world_size: 5 ranks cannot hold equal contiguous shards"):
        pg.distributed.plan(causal, 5)
    with pytest.raises(ValueError, match="q tiles 64 straddle the contiguous shards"):
        pg.distributed.plan(causal, 3, pg.Tiling(64, 64))
    with pytest.raises(ValueError, match="length-free"):
        pg.distributed.plan(pg.Spec(pg.Causal(), num_heads=1, head_dim=16), 2)
    with pytest.raises(ValueError, match="picks its keys at run time"):
        pg.distributed.plan(pg.Spec(pg.Routed(16, 1), 96, num_heads=1, head_dim=16), 2)
    with pytest.raises(ValueError, match="world_size: expected an int >= 1"):
        pg.distributed.plan(causal, 0)
    with pytest.raises(ValueError, match="layout: expected one of"):
        pg.distributed.plan(causal, 2, layout="ring")
    with pytest.raises(ValueError, match="cannot hold equal zigzag shards"):
        pg.distributed.plan(pg.Spec(pg.Causal(), 100, num_heads=1, head_dim=16), 4, pg.Tiling(1, 1), "zigzag")

"""`pg.simulate(spec, world_size=N, link=...)` (issue 15 item 4): per-rank compute, bytes and
time of a sequence-sharded run, from the distributed plan and the time model."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.sim import load_link, predict_time, simulate_sharding
from patterngen.sim.sharding import _rank_workloads
from tests.strategies import patterns, scaled


def per_token(spec: pg.Spec, batch: int = 1) -> int:
    return 2 * spec.num_kv_heads * spec.head_dim * 2 * batch  # K and V, bf16


@settings(max_examples=scaled(20), deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(1, 2), st.data())
def test_ranks_share_the_one_gpu_work_and_receive_the_plan(world, tiles_per_chunk, batch, data):
    n = 2 * world * tiles_per_chunk * 16
    spec = pg.Spec(data.draw(patterns((n,), (n,), window=False)), n, num_heads=2, num_kv_heads=data.draw(
        st.sampled_from([1, 2])), head_dim=16)
    tiling = pg.Tiling(16, 16)
    r = simulate_sharding(spec, world, batch=batch, tiling=tiling)
    p = pg.distributed.plan(spec, world, tiling, r.layout)
    one = pg.build_plan(spec, tiling)
    visited = sum(one.head_plan(h).visited for h in range(spec.num_heads)) * batch
    assert sum(f.visited for f in r.ranks) == visited  # every CTA of the one-GPU run on exactly one rank
    for f in r.ranks:
        assert f.visited == p.visited_pairs(f.rank) * batch
        assert f.received_tokens == p.received_tokens[f.rank]
        assert f.received_bytes == f.received_tokens * per_token(spec, batch)
        assert f.time_s == pytest.approx(max(f.own_s, f.transfer_s) + f.received_s)
    assert r.time_s == max(f.time_s for f in r.ranks)
    assert r.candidates[r.layout] == min(r.candidates.values())
    slow = simulate_sharding(spec, world, link="infiniband-ndr", batch=batch, tiling=tiling, layout=r.layout)
    assert slow.time_s >= r.time_s  # a slower link never predicts a faster run


def test_zigzag_is_chosen_for_causal_and_contiguous_for_a_window():
    causal = pg.Spec(pg.Causal(), 32768, num_heads=8, head_dim=128)
    r = pg.simulate(causal, world_size=4)
    assert r.layout == "zigzag" and r.candidates["zigzag"] < r.candidates["contiguous"]
    assert len({f.visited for f in r.ranks}) == 1  # balanced
    window = pg.Spec(pg.Band(1024) & pg.Causal(), 32768, num_heads=8, head_dim=128)
    w = pg.simulate(window, world_size=4, link="pcie-gen5")
    assert w.layout == "contiguous"
    assert [f.received_tokens for f in w.ranks] == [0, 1024, 1024, 1024]  # rounded to 128-key tiles: 1024 + 0
    assert w.ring_bytes == 3 * 8192 * per_token(window)
    assert w.ranks[1].transfer_s == pytest.approx(15e-6 + 1024 * per_token(window) / (64e9 * 0.8))  # pcie-gen5.json
    assert "zigzag" in w.summary() and "rank" in w.table()


def test_transfer_time_counts_rounds(tmp_path):
    """A 3-D window over 4 ranks: each middle rank receives a frame from both neighbours, in two
    rounds (a rank may not receive twice in one)."""
    spec = pg.Spec(pg.Window((3, 5, 5)), (16, 16, 16), num_heads=1, head_dim=64)
    link = {"name": "test", "bandwidth_gbs": 1.0, "latency_us": 0.0, "efficiency": 1.0}
    r = pg.simulate(spec, (1, 8, 8), (1, 8, 8), world_size=4, link=link, layout="contiguous")
    frame = 256 * per_token(spec)
    assert r.rounds == 2
    assert [f.received_bytes for f in r.ranks] == [frame, 2 * frame, 2 * frame, frame]
    assert r.ranks[1].transfer_s == pytest.approx(2 * frame / 1e9)
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({**link, "bandwidth_gbs": 0.5}))
    assert pg.simulate(spec, (1, 8, 8), (1, 8, 8), world_size=4, link=str(path)).ranks[1].transfer_s == \
        pytest.approx(4 * frame / 1e9)


def test_own_and_received_compute_split_the_rank_work():
    spec = pg.Spec(pg.Band(100) & pg.Causal(), 1024, num_heads=2, head_dim=64)
    dp = pg.distributed.plan(spec, 2, pg.Tiling(64, 64))
    everything, own, received = _rank_workloads(dp, 1, 1)
    assert int(everything.unit_full.sum() + everything.unit_partial.sum()) == dp.visited_pairs(1)
    assert int(everything.unit_full.sum() - own.unit_full.sum() + everything.unit_partial.sum()
               - own.unit_partial.sum()) == 2 * 3  # q tile 8 reads kv tiles 6, 7 of rank 0, q tile 9 tile 7; 2 heads
    assert int(received.unit_full.sum() + received.unit_partial.sum()) == 2 * 3 and received.units == 2 * 2
    dev = pg.sim.load_device("h100")
    assert float(predict_time(dev, own)) <= float(predict_time(dev, everything))


def test_bad_arguments():
    spec = pg.Spec(pg.Causal(), 256, num_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="link and layout describe a sharded run"):
        pg.simulate(spec, link="nvlink-h100")
    with pytest.raises(ValueError, match="both q_tile and kv_tile"):
        pg.simulate(spec, 16, world_size=2)
    with pytest.raises(ValueError, match="unknown link 'token-ring'.*nvlink-h100"):
        pg.simulate(spec, world_size=2, link="token-ring")
    with pytest.raises(ValueError, match="'efficiency' is a fraction"):
        pg.simulate(spec, world_size=2, link={"name": "x", "bandwidth_gbs": 1, "latency_us": 1, "efficiency": 2})
    with pytest.raises(ValueError, match="lacks \\['latency_us'"):
        load_link({"name": "x", "bandwidth_gbs": 1, "efficiency": 1})
    with pytest.raises(ValueError, match="cannot hold equal"):
        pg.simulate(spec, world_size=3)
    with pytest.raises(ValueError, match="batch: expected an int"):
        pg.simulate(spec, world_size=2, batch=0)
    routed = pg.Spec(pg.Routed(16, 1), 256, num_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="no block_indices"):
        pg.simulate(routed, world_size=2, block_indices=torch.zeros(1, 1, 16, 1, dtype=torch.long))


def test_command_line(capsys):
    from pathlib import Path
    from patterngen.tools.cli import main
    example = str(Path(__file__).parents[1] / "examples" / "mistral_sliding_window.py")
    assert main(["simulate", example, "--world-size", "4", "--link", "pcie-gen5"]) == 0
    out = capsys.readouterr().out
    assert "4 ranks, contiguous layout" in out and "pcie-gen5" in out and "received MB" in out
    assert main(["simulate", example, "--world-size", "4", "--link", "nope"]) == 2
    assert "unknown link 'nope'" in capsys.readouterr().err

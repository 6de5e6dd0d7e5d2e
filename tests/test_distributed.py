"""`pg.distributed.attention` (issue 15) on the CPU: gloo, 2 and 4 processes.

Every rank builds the same full inputs from one seed, takes its shard, and checks its output
and its shards' gradients against single-process `pg.attention` on the full tensors (float64,
to 1e-9), and its received tokens and rounds against the plan. One spawn per world size runs
every case (process start-up dominates on this machine): hand-picked 1-D, 3-D, Heads, GQA and
zig-zag cases, and random compositions drawn by hypothesis. Bad input (a short shard on one
rank, different specs on two ranks) raises the same clear error on every rank, with no hang.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import patterns, scaled

JOIN_TIMEOUT_S = 600
"""A hang in a collective must fail the test, not stall CI."""


def fixed_cases(world: int) -> list[tuple[str, pg.Spec, str]]:
    n = 64 * world
    return [
        ("band&causal", pg.Spec(pg.Band(20) & pg.Causal(), n, num_heads=2, head_dim=8), "contiguous"),
        ("sinks|band, gqa", pg.Spec((pg.Sink(3) | pg.Band(9)) & pg.Causal(), n, num_heads=4, num_kv_heads=2,
                                    head_dim=8), "contiguous"),
        ("heads", pg.Spec(pg.Heads([pg.Causal(), pg.Band(7), pg.Strided(5, 2) | pg.Global(3)]), n, num_heads=3,
                          head_dim=8), "contiguous"),
        ("causal zigzag", pg.Spec(pg.Causal(), n, num_heads=2, num_kv_heads=1, head_dim=8), "zigzag"),
        ("causal, gqa", pg.Spec(pg.Causal(), n, num_heads=4, num_kv_heads=2, head_dim=8), "contiguous"),
        ("video window", pg.Spec(pg.Window((3, 3, 5), stride=(1, 1, 2)), (2 * world, 4, 6), num_heads=2, head_dim=8),
         "contiguous"),
        ("fewer keys than queries", pg.Spec(pg.Band(10) & pg.Causal(), n, n // 2, num_heads=2, head_dim=8),
         "contiguous"),
    ]


PATHS = {"band&causal": "op", "causal, gqa": "op", "sinks|band, gqa": "reference", "heads": "reference",
         "causal zigzag": "reference", "video window": "reference", "fewer keys than queries": "reference"}
"""Which computation each fixed case runs on every rank (`stats["path"]`)."""


def _shard(x: torch.Tensor, runs) -> torch.Tensor:
    return torch.cat([x[:, :, a:b] for a, b in runs], 2)


def check_case(name: str, spec: pg.Spec, layout: str, rank: int, world: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, spec.num_heads, spec.nq, spec.head_dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g, dtype=torch.float64)
            for _ in range(2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = pg.attention(*full, spec)
    want.backward(dout)

    p = pg.distributed.plan(spec, world, layout=layout)
    qs, ks, vs = (_shard(t, p.q_shards[rank] if i == 0 else p.kv_shards[rank]).requires_grad_(True)
                  for i, t in enumerate((q, k, v)))
    stats = {}
    out = pg.distributed.attention(qs, ks, vs, spec, layout=layout, stats=stats)
    out.backward(_shard(dout, p.q_shards[rank]))
    where = f"{name} (rank {rank} of {world})"
    torch.testing.assert_close(out, _shard(want.detach(), p.q_shards[rank]), atol=1e-9, rtol=1e-9, msg=where)
    for label, got, ref, runs in (("dq", qs, full[0], p.q_shards[rank]), ("dk", ks, full[1], p.kv_shards[rank]),
                                  ("dv", vs, full[2], p.kv_shards[rank])):
        torch.testing.assert_close(got.grad, _shard(ref.grad, runs), atol=1e-9, rtol=1e-9,
                                   msg=lambda m, label=label: f"{where} {label}: {m}")
    assert stats["received_tokens"] == p.received_tokens[rank], (where, stats, p.received_tokens)
    assert stats["received_bytes"] == 2 * 2 * spec.num_kv_heads * spec.head_dim * 8 * p.received_tokens[rank]
    assert stats["rounds"] == len(p.rounds)
    # causal windows and causal attention (keys just before a rank's own) run as one op call
    if name in PATHS:
        assert stats["path"] == PATHS[name], (where, stats["path"])


def check_bad_input(rank: int, world: int) -> None:
    spec = pg.Spec(pg.Band(4) & pg.Causal(), 16 * world, num_heads=1, head_dim=4)
    n = 16
    q, k, v = (torch.randn(1, 1, n, 4) for _ in range(3))
    short = q[:, :, :n - 1] if rank == world - 1 else q
    with pytest.raises(ValueError, match=rf"bad input on rank {world - 1}: ValueError: q: expected this rank's "
                                         rf"shard \[B, H, N / world_size, D\] = \[1, 1, 16, 4\]"):
        pg.distributed.attention(short, k, v, spec)
    other = pg.Spec(pg.Band(5) & pg.Causal(), 16 * world, num_heads=1, head_dim=4) if rank == 0 else spec
    with pytest.raises(ValueError, match="the ranks were given different calls .*Band\\(5\\).*every rank must pass"):
        pg.distributed.attention(q, k, v, other)
    with pytest.raises(ValueError, match="bad input on rank 0.*rank 1.*world_size: .* not a multiple"):
        pg.distributed.attention(q, k, v, pg.Spec(pg.Causal(), 16 * world + 1, num_heads=1, head_dim=4))


def _worker(rank: int, world: int, cases: list) -> None:
    check_bad_input(rank, world)
    for i, (name, spec, layout) in enumerate(cases):
        check_case(name, spec, layout, rank, world, seed=i)
    dist.barrier()


def run_ranks(world: int, cases: list) -> None:
    """`world` gloo processes running `cases`; a rank's failure fails the test with its traceback."""
    try:
        pg.distributed.run_ranks(_worker, world, (cases,), timeout_s=JOIN_TIMEOUT_S)
    except RuntimeError as e:
        pytest.fail(str(e))


@st.composite
def random_cases(draw, world: int) -> list:
    """1-D compositions (windows excluded: 1-D Windows are Bands) over 2 tiles per rank and 3-D
    windows over slabs, random heads, in both layouts."""
    out = []
    for i in range(3):
        n = 2 * world * draw(st.integers(2, 12))
        layout = draw(st.sampled_from(pg.distributed.LAYOUTS))
        hkv = draw(st.sampled_from([1, 2]))
        out.append((f"random 1-D #{i}", pg.Spec(draw(patterns((n,), (n,), window=False)), n,
                                                num_heads=hkv * draw(st.sampled_from([1, 2])), num_kv_heads=hkv,
                                                head_dim=4), layout))
    shape = (world * draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    out.append(("random grid", pg.Spec(draw(patterns(shape, shape)), shape, num_heads=1, head_dim=4), "contiguous"))
    return out


@pytest.mark.parametrize("world", [2, 4])
@settings(max_examples=scaled(1), deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_sharded_attention_equals_one_process(world, data):
    """(No shrinking: every example spawns the ranks anew; the failing rank's traceback names
    the case.)"""
    run_ranks(world, fixed_cases(world) + data.draw(random_cases(world)))


def test_needs_an_initialised_process_group():
    spec = pg.Spec(pg.Causal(), 32, num_heads=1, head_dim=4)
    q = torch.randn(1, 1, 16, 4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        pg.distributed.attention(q, q, q, spec)

"""`pg.kv_keep(spec, q_pos)`: the cached keys a later query can still see (issue 14 item 5).
Oracle: every query at position >= q_pos of every later call (nq queries against nkv keys, up to
a horizon), through the dense mask; kv_keep must hold all they see (safe) and nothing that none
of them sees (tight)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import scaled

LEAVES = st.one_of(st.just(pg.Causal()), st.just(pg.Full()),
                   st.builds(pg.Band, st.integers(0, 6), st.integers(0, 3)),
                   st.builds(pg.Sink, st.integers(1, 4)), st.builds(pg.Global, st.integers(1, 3)),
                   st.integers(1, 4).flatmap(lambda s: st.builds(pg.Strided, st.just(s), st.integers(0, s - 1),
                                                                 st.integers(1, 3))),
                   st.integers(1, 6).flatmap(lambda b: st.builds(pg.Blocks, st.just(b), st.integers(0, b - 1))))
PATTERNS = st.recursive(LEAVES, lambda inner: st.one_of(st.builds(lambda a, b: a | b, inner, inner),
                                                        st.builds(lambda a, b: a & b, inner, inner)), max_leaves=4)
HORIZON = 10


def seen_later(spec: pg.Spec, q_pos: int) -> torch.Tensor:
    """bool [Hkv, q_pos]: keys j < q_pos seen by some query at position >= q_pos of a call with
    nkv <= q_pos + HORIZON keys (any nq), for some query head of the kv head."""
    out = torch.zeros(spec.num_heads, q_pos, dtype=torch.bool)
    for nkv in range(q_pos + 1, q_pos + HORIZON):
        for nq in range(1, nkv + 1):
            rows = torch.arange(nq) + nkv - nq >= q_pos  # queries at or after q_pos
            if rows.any():
                out |= pg.dense_mask(spec.bind(nq, nkv))[:, rows, :q_pos].any(1)
    return out.reshape(spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, q_pos).any(1)


@settings(max_examples=scaled(30), deadline=None)
@given(st.lists(PATTERNS, min_size=1, max_size=4), st.sampled_from([1, 2]), st.integers(0, 14))
def test_keeps_exactly_what_later_queries_see(patterns, group, q_pos):
    heads = len(patterns) * group
    spec = pg.Spec(pg.Heads([p for p in patterns for _ in range(group)]), num_heads=heads,
                   num_kv_heads=len(patterns), head_dim=8)
    keep = pg.kv_keep(spec, q_pos)
    assert keep.shape == (len(patterns), q_pos)
    assert torch.equal(keep, seen_later(spec, q_pos))


def test_routed_keeps_everything_and_bad_input():
    spec = pg.Spec(pg.Routed(4, 1) | (pg.Band(2) & pg.Causal()), num_heads=1, head_dim=8)
    assert pg.kv_keep(spec, 9).all()
    with pytest.raises(ValueError, match="length-free 1-D spec"):
        pg.kv_keep(pg.Spec(pg.Causal(), 8, num_heads=1, head_dim=8), 4)
    with pytest.raises(ValueError, match="q_pos: expected an int >= 0"):
        pg.kv_keep(pg.Spec(pg.Causal(), num_heads=1, head_dim=8), -1)

"""patterngen.integrations.flex: the FlexAttention mask_mod and block mask of a spec mean what the oracle means."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.integrations.flex import block_mask_for, dense_mask_via_flex, mask_mod_for
from tests.strategies import routed_specs, scaled, specs

pytest.importorskip("torch.nn.attention.flex_attention")
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def oracle_attention(q, k, v, mask):
    """Attention in float64 with a dense mask; rows with no visible key give zeros."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).float()


def block_any(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """[H, Nq, Nkv] -> [H, q blocks, kv blocks]: does any pair of the block attend."""
    H, nq, nkv = mask.shape
    pad = torch.zeros(H, -(-nq // bq) * bq, -(-nkv // bk) * bk, dtype=torch.bool)
    pad[:, :nq, :nkv] = mask
    return pad.view(H, pad.shape[1] // bq, bq, pad.shape[2] // bk, bk).any(4).any(2)


@settings(max_examples=scaled(60))
@given(specs())
def test_mask_mod_equals_oracle(spec):
    """create_mask over the mask_mod is the dense oracle, head by head (all primitives,
    n-D windows with stride/dilation/causal, Heads, GQA, Nq != Nkv)."""
    assert torch.equal(dense_mask_via_flex(spec), pg.dense_mask(spec))


@settings(max_examples=scaled(15))
@given(routed_specs())
def test_routed_mask_mod_equals_oracle(spec_and_indices):
    spec, idx = spec_and_indices
    want = pg.dense_mask(spec, idx)
    want = want[0] if want.dim() == 4 else want
    assert torch.equal(dense_mask_via_flex(spec, block_indices=idx), want)


@settings(max_examples=scaled(20))
@given(specs(), st.sampled_from([16, 32]))
def test_block_mask_marks_exactly_the_visited_blocks(spec, bs):
    """Blocks the block mask keeps are those with a visible pair; its full blocks are fully visible."""
    bm = block_mask_for(spec, bs)
    mask = pg.dense_mask(spec)
    dense = bm.to_dense()[0].bool()  # [1 or H, q blocks, kv blocks]
    want = block_any(mask, bs, bs)
    assert torch.equal(dense.expand_as(want), want)
    if bm.full_kv_num_blocks is not None:
        full = torch.zeros_like(dense)
        nfull, idx = bm.full_kv_num_blocks[0], bm.full_kv_indices[0]
        for h in range(full.shape[0]):
            for qb in range(full.shape[1]):
                full[h, qb, idx[h, qb, :nfull[h, qb]].long()] = True
        all_visible = ~block_any(~mask, bs, bs)
        assert not (full.expand_as(want) & ~all_visible).any()


@settings(max_examples=scaled(12))
@given(specs())
def test_flex_attention_matches_oracle(spec):
    """FlexAttention (eager on CPU) with the block mask computes the spec's attention."""
    g = torch.Generator().manual_seed(0)
    D = spec.head_dim
    q = torch.randn(1, spec.num_heads, spec.nq, D, generator=g)
    k = torch.randn(1, spec.num_kv_heads, spec.nkv, D, generator=g)
    v = torch.randn(1, spec.num_kv_heads, spec.nkv, D, generator=g)
    bm = block_mask_for(spec, 16)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=spec.num_heads != spec.num_kv_heads)
    want = oracle_attention(q, k, v, pg.dense_mask(spec)[None])
    assert (out - want).abs().max() < 1e-4


def test_flex_attention_matches_sdpa_with_dense_mask():
    """The benchmark's own comparison on one multi-head spec: flex vs SDPA with the mask."""
    spec = pg.Spec(pg.Heads([pg.Band(7) | pg.Sink(2), pg.Strided(3, 1) & pg.Causal(), pg.Causal(), pg.Full()]),
                   (48,), kv_shape=(64,), num_heads=4, num_kv_heads=2, head_dim=32)
    q, k, v = torch.randn(1, 4, 48, 32), torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32)
    out = flex_attention(q, k, v, block_mask=block_mask_for(spec, 16), enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=pg.dense_mask(spec)[None],
                                                           enable_gqa=True)
    assert (out - ref).abs().max() < 1e-5


def test_compiled_block_mask_equals_eager():
    """The GPU path builds block masks through torch.compile: the traced mask_mod must agree."""
    spec = pg.Spec(pg.Heads([pg.Window((3, 4), stride=(1, 2), dilation=(2, 1), causal=(True, False)),
                             pg.Band(5) | pg.Sink(3), pg.Window((3, 4), stride=(1, 2), dilation=(2, 1),
                                                                causal=(True, False))]),
                   (8, 8), num_heads=3, head_dim=16)
    eager = block_mask_for(spec, 16, compile=False)
    compiled = block_mask_for(spec, 16, compile=True)
    assert eager.shape == compiled.shape == (1, 3, 64, 64)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        a, b = getattr(eager, name), getattr(compiled, name)
        nums = getattr(eager, name.replace("indices", "num_blocks"))
        if "indices" in name:  # only the used slots of each row are meaningful
            used = torch.arange(a.shape[-1]) < nums[..., None]
            a, b = a[used], b[used]
        assert torch.equal(a, b), name


def test_shared_pattern_has_no_head_dim():
    spec = pg.Spec(pg.Window(5), (12, 12), num_heads=8, head_dim=16)
    assert block_mask_for(spec, 16).shape[1] == 1
    heads = pg.Spec(pg.Heads({range(0, 4): pg.Causal(), range(4, 8): pg.Band(4)}), 64, num_heads=8)
    assert block_mask_for(heads, 16).shape[1] == 8


def test_errors():
    routed = pg.Spec(pg.Routed(8, 2), 64, num_heads=2)
    with pytest.raises(ValueError, match="block_indices"):
        mask_mod_for(routed)
    with pytest.raises(ValueError, match="block_indices"):
        block_mask_for(routed, 16)
    with pytest.raises(ValueError, match="no Routed"):
        mask_mod_for(pg.Spec(pg.Causal(), 64), block_indices=torch.zeros(1, 8, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="spec"):
        mask_mod_for(pg.Causal())
    with pytest.raises(ValueError, match="block_size"):
        block_mask_for(pg.Spec(pg.Causal(), 64), 0)


def test_head_routed_mask_mod_is_oracle_and_chosen():
    """With MoH head routing the mask_mod is the pattern's mask and'ed with the chosen (token, head)."""
    from torch.nn.attention.flex_attention import create_mask
    spec = pg.Spec(pg.Heads([pg.Causal(), pg.Window(5)]), 24, num_heads=2, head_dim=8)
    idx = torch.randint(-1, 2, (3, 24, 1), generator=torch.Generator().manual_seed(0))
    chosen = pg.gate_heads(idx, torch.ones(idx.shape), 2) > 0
    got = create_mask(mask_mod_for(spec, head_chosen=chosen), 3, 2, 24, 24, device="cpu")
    assert torch.equal(got, pg.dense_mask(spec)[None] & chosen[..., None])
    bm = block_mask_for(spec, 16, head_chosen=chosen)
    assert bm.kv_num_blocks.shape[:2] == (3, 2)

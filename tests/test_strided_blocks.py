"""`pg.Strided(stride, offset, block)` (issue 16 item 1): key j is visible iff
(j // block) % stride == offset. S2-Attention's DKernel strides over 64-key blocks with a
per-head offset; with `block` a multiple of the kv tile the strided part is fully
block-sparse (no mask code), where the token-level stride leaves every tile partial."""
import torch

import patterngen as pg
from patterngen.backends.triton import TritonForward
from tests.helpers import dense_attention


def test_block_shards_are_fully_block_sparse():
    blocks = pg.build_plan(pg.Spec(pg.Strided(4, 1, block=64), 1024, num_heads=1, head_dim=64),
                           pg.Tiling(64, 64)).counts()
    assert blocks["partial"] == 0 and blocks["visited"] == 16 * 4  # every q tile, kv tiles 1, 5, 9, 13
    tokens = pg.build_plan(pg.Spec(pg.Strided(4, 1), 1024, num_heads=1, head_dim=64), pg.Tiling(64, 64)).counts()
    assert tokens["full"] == 0 and tokens["visited"] == 16 * 16
    half = pg.build_plan(pg.Spec(pg.Strided(4, 1, block=32), 1024, num_heads=1, head_dim=64),
                         pg.Tiling(64, 64)).counts()
    assert half["full"] == 0 and half["visited"] == 16 * 8  # 32-key blocks: half of every other tile


def test_dkernel_local_stride_heads():
    """DKernel's rule at block level, head h: kv block b is strided-visible iff
    (b + 1 + h) % vert_stride == 0; with Strided's offset (vert_stride - 1 - h) % vert_stride
    the token masks agree (causal, 8 heads, 16-key blocks)."""
    vs, block, n = 4, 16, 256
    spec = pg.Spec(pg.Heads([pg.Strided(vs, (vs - 1 - h) % vs, block=block) & pg.Causal() for h in range(8)]), n,
                   num_heads=8, head_dim=16)
    j = torch.arange(n)
    want = torch.stack([((j // block + 1 + h) % vs == 0)[None, :] & (j[None, :] <= j[:, None]) for h in range(8)])
    assert torch.equal(pg.dense_mask(spec), want)


def test_counts_and_kernel_agree_with_the_oracle():
    """The simulator's exact count, and the generated kernel under the interpreter, on an S2
    head: local band | strided 16-key blocks, causal, at 16-token tiles."""
    pattern = (pg.Band(20) | pg.Strided(3, 1, block=16)) & pg.Causal()
    spec = pg.Spec(pattern, 160, num_heads=2, head_dim=16)
    assert pg.simulate(spec, 16, 16).visible_pairs == int(pg.dense_mask(spec).sum())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 160, 16, generator=g) for _ in range(3))
    out, _ = TritonForward(spec, pg.Tiling(16, 16))(q, k, v)
    want, _ = dense_attention(q, k, v, spec)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)


def test_repr_and_json():
    s = pg.Strided(4, 1, block=64)
    assert repr(s) == "Strided(4, 1, block=64)" and repr(pg.Strided(4, block=8)) == "Strided(4, 0, block=8)"
    assert repr(pg.Strided(4)) == "Strided(4)"
    spec = pg.Spec(s & pg.Causal(), 256)
    assert pg.from_json(spec.to_json()) == spec
    old = '{"patterngen": 1, "type": "Spec", "pattern": {"type": "Strided", "stride": 3, "offset": 1}, "q_shape": [9]}'
    assert pg.from_json(old).pattern == pg.Strided(3, 1)  # files written before `block` still read

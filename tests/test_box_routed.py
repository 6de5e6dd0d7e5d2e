"""`pg.Routed(block, topk)` with a tuple block on an n-D grid (issue 16 item 3): boxes of that
shape, numbered row-major over the grid of boxes (BiFormer's regions), and `pg.route` on
grid-shaped q and k. Oracle: the box membership written from the definition, and float64
attention over the dense mask."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.dispatch import compile_options
from tests.helpers import dense_attention
from tests.strategies import scaled


def box_ids(shape, block) -> torch.Tensor:
    """Each token's box, straight from the definition (row-major boxes, row-major tokens)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).view(-1, len(shape))
    boxes = [n // b for n, b in zip(shape, block)]
    ids = torch.zeros(len(coords), dtype=torch.long)
    for d, (b, nb) in enumerate(zip(block, boxes)):
        ids = ids * nb + coords[:, d] // b
    return ids


@settings(max_examples=scaled(15), deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=2, max_size=3), st.integers(1, 4),
       st.sampled_from([(2, 1), (2, 2)]), st.data())
def test_regions_against_the_definition(dims, topk, heads, data):
    """Mask, forward and gradients of random box blocks on 2-D and 3-D grids with random
    indices (duplicates and -1 slots), GQA."""
    block = tuple(b for b, _ in dims)
    shape = tuple(b * n for b, n in dims)
    H, Hkv = heads
    spec = pg.Spec(pg.Routed(block, min(topk, len(box_ids(shape, block).unique()))), shape, num_heads=H,
                   num_kv_heads=Hkv, head_dim=8)
    nb = box_ids(shape, block).max().item() + 1
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    idx = torch.randint(-1, nb, (1, Hkv, nb, spec.routed.topk), generator=g)
    mask = pg.dense_mask(spec, idx)[0]
    ids = box_ids(shape, block)
    for h in range(H):
        chosen = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            for kb in idx[0, h // (H // Hkv), qb].tolist():
                if kb >= 0:
                    chosen[qb, kb] = True
        assert torch.equal(mask[h], chosen[ids[:, None], ids[None, :]])
    q = torch.randn(1, H, spec.nq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, Hkv, spec.nkv, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = pg.attention(q, k, v, spec, block_indices=idx)
    want, _ = dense_attention(q, k, v, spec, idx)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_route_on_grids_picks_regions_by_mean_affinity():
    """pg.route on grid-shaped q and k: the key region whose mean matches the query region's
    mean best is picked, besides the region itself; equal to flat routing in block-major order."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, 8, 16, generator=g)
    k = torch.randn(1, 1, 8, 8, 16, generator=g)
    idx = pg.route(q, k, (4, 4), 2)
    assert idx.shape == (1, 1, 4, 2)
    regions = lambda t: t.view(*t.shape[:2], 2, 4, 2, 4, 16).permute(0, 1, 2, 4, 3, 5, 6).reshape(  # noqa: E731
        *t.shape[:2], 4, 16, 16)
    qm, km = regions(q).mean(3).sum(1), regions(k).mean(3)[:, 0]
    scores = qm @ km.transpose(-1, -2)  # [1, 4, 4]
    for r in range(4):
        others = scores[0, r].clone()
        others[r] = float("-inf")
        assert set(idx[0, 0, r].tolist()) == {r, int(others.argmax())}


def test_kernels_run_regions_in_block_major_order():
    """On the Triton backend (the interpreter here) the box-routed spec runs as flat routing of
    whole boxes in block-major order, equal to the oracle on the image layout."""
    spec = pg.Spec(pg.Routed((4, 4), 2), (8, 8), num_heads=2, head_dim=16)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    idx = pg.route(q.view(1, 2, 8, 8, 16), k.view(1, 2, 8, 8, 16), (4, 4), 2)
    out = pg.attention(q, k, v, spec, block_indices=idx, _options=compile_options("triton", None))
    want, _ = dense_attention(q, k, v, spec, idx)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)


def test_example_and_errors():
    import runpy
    from pathlib import Path
    spec = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "biformer_regions.py"))["spec"]
    assert spec.routed == pg.Routed((8, 8), 4) and spec.q_shape == (56, 56)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 56, 56, 8, generator=g) for _ in range(2))
    report = pg.simulate(spec, (8, 8), (8, 8), block_indices=pg.route(q, k, (8, 8), 4))
    assert report.visible_pairs == 2 * 3136 * 4 * 64  # every query: 4 distinct regions of 64 keys, 2 heads
    assert report.tile_speedup == pytest.approx(49 / 4)  # tiles of a region (64 tokens in block-major order)
    with pytest.raises(ValueError, match="whole boxes; dimension 1 \\(6\\) is not a multiple of 4"):
        pg.Spec(pg.Routed((2, 4), 1), (8, 6))
    with pytest.raises(ValueError, match="causal=True orders the flattened tokens"):
        pg.Routed((2, 2), 1, causal=True)
    with pytest.raises(ValueError, match="grid-shaped q and k"):
        pg.route(torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8), (4, 4), 1)
    with pytest.raises(ValueError, match="pg.compile"):
        pg.compile(spec)

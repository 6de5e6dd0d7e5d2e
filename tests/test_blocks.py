"""`pg.Blocks(size, shift)` (issue 16 item 2): query and key see each other iff they share the
block floor((x - shift) / size) along every dimension. Oracles: Swin Transformer's own
construction of shifted-window attention (roll, partition, region labels), the dense mask
for the kernels, and exact plan and count checks."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.backends.triton import TritonBackward, TritonForward, backward_tiling
from tests.helpers import check_plan, dense_attention, dense_gradients
from tests.strategies import scaled


def swin_mask(H: int, W: int, M: int, s: int) -> torch.Tensor:
    """bool [H*W, H*W] of Swin's (shifted) window attention in the image's own token order:
    roll the map by -s, label the three regions per axis that the roll brought together,
    partition into M x M windows, keep pairs of one window and one label, roll back."""
    label = torch.zeros(H, W, dtype=torch.long)
    if s:
        n = 0
        for hs in (slice(0, H - M), slice(H - M, H - s), slice(H - s, H)):
            for ws in (slice(0, W - M), slice(W - M, W - s), slice(W - s, W)):
                label[hs, ws] = n
                n += 1
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")  # rolled coordinates
    window = ((y // M) * (W // M) + x // M).flatten()
    label = label.flatten()
    rolled = (window[:, None] == window[None, :]) & (label[:, None] == label[None, :])
    source = (((y + s) % H) * W + (x + s) % W).flatten()  # the image token at each rolled position
    mask = torch.zeros(H * W, H * W, dtype=torch.bool)
    mask[source[:, None], source[None, :]] = rolled
    return mask


@pytest.mark.parametrize("H, W, M", [(8, 8, 4), (12, 8, 4), (14, 21, 7), (6, 6, 3)])
def test_swin_shifted_windows_are_blocks(H, W, M):
    for s in (0, M // 2, 1, M - 1):
        spec = pg.Spec(pg.Blocks(M, shift=s), (H, W), num_heads=1, head_dim=16)
        assert torch.equal(pg.dense_mask(spec)[0], swin_mask(H, W, M, s)), (H, W, M, s)


def test_aligned_blocks_are_fully_block_sparse():
    """Tiles that never straddle a block border: no mask code at all, also shifted."""
    for shift, tile in ((0, (8, 8)), (4, (4, 4)), (2, (2, 4))):
        spec = pg.Spec(pg.Blocks(8, shift=(shift, shift - shift % 4)), (32, 32), num_heads=1, head_dim=16)
        counts = check_plan(spec, pg.Tiling(tile, tile)).counts()
        assert counts["partial"] == 0, (shift, tile, counts)
    flat = check_plan(pg.Spec(pg.Blocks(64, shift=32), 1024, num_heads=1, head_dim=16), pg.Tiling(32, 32)).counts()
    assert flat["partial"] == 0 and flat["visited"] == 1 + 15 * 2 * 2 + 1  # the edge blocks hold 32 keys, one tile


@settings(max_examples=scaled(6), deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.integers(1, 6), st.integers(1, 6), st.data())
def test_kernels_against_the_oracle_on_grids(h, w, bh, bw, data):
    """Forward and backward kernels (interpreter) of 2-D blocks, any shift, composed with a
    second pattern per head (Heads, GQA), on box and flat tiles."""
    shifts = (data.draw(st.integers(0, bh - 1)), data.draw(st.integers(0, bw - 1)))
    blocks = pg.Blocks((bh, bw), shift=shifts)
    other = data.draw(st.sampled_from([pg.Full(), pg.Blocks((bh, bw)), pg.Window(2) if min(h, w) >= 2 else pg.Full(),
                                       pg.Sink(3)]))
    spec = pg.Spec(pg.Heads([blocks, blocks | other]), (h, w), num_heads=2, num_kv_heads=1, head_dim=16)
    tile = data.draw(st.sampled_from([((4, 4), (4, 4)), ((2, 8), (4, 4)), (16, 16)]))
    check_kernels(spec, pg.Tiling(*tile) if isinstance(tile[0], tuple) else pg.Tiling(tile[0], tile[1]), data)


@settings(max_examples=scaled(6), deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.data())
def test_length_free_blocks_any_length(nq, nkv, size, data):
    """1-D blocks of a length-free spec, queries aligned bottom-right to the keys (more queries
    than keys included), alone and with Causal, through the forward and backward kernels."""
    blocks = pg.Blocks(size, shift=data.draw(st.integers(0, size - 1)))
    pattern = data.draw(st.sampled_from([blocks, blocks & pg.Causal(), blocks | pg.Sink(2)]))
    spec = pg.Spec(pattern, num_heads=2, head_dim=16)
    check_kernels(spec.bind(nq, nkv), pg.Tiling(16, 16), data, free=spec)


def check_kernels(spec: pg.Spec, tiling: pg.Tiling, data, free: pg.Spec | None = None) -> None:
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, spec.num_heads, spec.nq, spec.head_dim, generator=g)
    k, v = (torch.randn(1, spec.num_kv_heads, spec.nkv, spec.head_dim, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    kernel = free or spec
    fwd = TritonForward(kernel, tiling)
    out, lse = fwd(q, k, v)
    want, _ = dense_attention(q, k, v, spec)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=0)
    bwd = TritonBackward(TritonForward(kernel, backward_tiling(tiling, spec.head_dim, kernel)))
    got = bwd(q, k, v, out, lse, dout)
    for g_, w_ in zip(got, dense_gradients(q, k, v, dout, spec)):
        torch.testing.assert_close(g_.double(), w_, atol=2e-4, rtol=0)


def test_swin_example_and_composition():
    """The Swin example's two layers; Blocks composes with the IR and the simulator."""
    import runpy
    from pathlib import Path
    specs = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "swin_shifted_windows.py"))["specs"]
    regular, shifted = specs
    assert regular.pattern == pg.Blocks(7) and shifted.pattern == pg.Blocks(7, shift=3)
    report = pg.simulate(shifted, (7, 7), (7, 7))
    assert report.visible_pairs == int(pg.dense_mask(shifted).sum())
    # per axis, 8 q tiles of 7 each meet the 2 shifted blocks that cut them: 2 + 6 * 3 + 2 kv tiles
    assert report.tile_speedup == pytest.approx(64 ** 2 / 22 ** 2)


def test_bad_blocks():
    with pytest.raises(ValueError, match="shift must be < size in every dimension; dimension 1 has shift 4"):
        pg.Blocks((4, 4), shift=(0, 4))
    with pytest.raises(ValueError, match="disagree in length"):
        pg.Blocks((4, 4), shift=(0, 1, 2))
    with pytest.raises(ValueError, match="Blocks on a grid needs the same grid"):
        pg.Spec(pg.Blocks(2), (4, 4), (4, 2))
    with pytest.raises(ValueError, match="has 2 dimension\\(s\\) but the spec has 1.*length-free"):
        pg.Spec(pg.Blocks((2, 2)), num_heads=1, head_dim=16)

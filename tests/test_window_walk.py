"""The forward's neighbourhood walk (render.Walk "window"): its full tiles (an inner box of the
kv-tile box, maybe empty) and its partial ones (the rest, slab by slab) under the Triton
interpreter, exact against the dense oracle for strided, causal and n-D windows on box and flat
tiles, q and kv tiles of different shapes, ragged grid edges included."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as in tests/test_triton.py

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.helpers import dense_attention
from tests.strategies import scaled

pytest.importorskip("triton", reason="the window walk is a Triton kernel")
pytestmark = pytest.mark.interpreter

from patterngen.backends.triton import TritonForward  # noqa: E402


def _box(ndim: int):
    return st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=ndim, max_size=ndim).filter(
        lambda b: 16 <= math.prod(b) <= 64).map(tuple)


@st.composite
def windows(draw):
    """An undilated Window on a 1-3-D grid (per dimension: any size, stride and causal flag) and
    a tiling: flat tiles in 1-D, boxes otherwise."""
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    shape = (draw(st.integers(2, 120)),) if ndim == 1 else tuple(draw(st.integers(2, 12)) for _ in range(ndim))
    size = [draw(st.integers(2, n)) for n in shape]
    stride = [draw(st.integers(1, w)) for w in size]
    causal = [draw(st.booleans()) for _ in shape]
    pattern = pg.Window(*((size[0], stride[0], 1, causal[0]) if ndim == 1 else
                          (tuple(size), tuple(stride), 1, tuple(causal))))
    tiles = st.sampled_from([16, 32]) if ndim == 1 else _box(ndim)
    return pg.Spec(pattern, shape, num_heads=2, head_dim=16), pg.Tiling(draw(tiles), draw(tiles))


def check(spec: pg.Spec, tiling: pg.Tiling, seed: int = 0) -> None:
    fwd = TritonForward(spec, tiling)
    assert fwd.walk.name == "window"
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, spec.nq, 16, generator=g) for _ in range(3))
    out, lse = fwd(q, k, v)
    ref, ref_lse = dense_attention(q, k, v, spec)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=0)


@settings(max_examples=scaled(16), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(), st.integers(0, 2**16))
def test_window_walk_matches_oracle(case, seed):
    check(*case, seed)


@pytest.mark.parametrize("spec, tiling", [
    # tiles larger than the window: no full tile at all (an empty inner box)
    (pg.Spec(pg.Window((3, 3)), (12, 12), num_heads=2, head_dim=16), pg.Tiling((4, 8), (8, 4))),
    # a window as large as the grid: every tile full but where the grid's edge cuts one
    (pg.Spec(pg.Window((10, 11)), (10, 11), num_heads=2, head_dim=16), pg.Tiling((4, 4), (2, 8))),
    # the video GNA's shape of stride, blocked along the last dimension, 1-D strided causal
    (pg.Spec(pg.Window((5, 6, 6), stride=(4, 2, 6)), (6, 8, 12), num_heads=2, head_dim=16),
     pg.Tiling((1, 4, 4), (2, 2, 8))),
    (pg.Spec(pg.Window(7, stride=6, causal=True), 73, num_heads=2, head_dim=16), pg.Tiling(16, 32)),
], ids=["no-full-tile", "all-full", "3-D-strided", "1-D-strided-causal"])
def test_window_walk_edge_cases(spec, tiling):
    check(spec, tiling)

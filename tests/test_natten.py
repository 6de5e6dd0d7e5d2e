"""`Window` against NATTEN's own mask rule (its Flex backend's mask_mod), which is the
definition patterngen promises to follow. Skipped where natten is not installed
(`pip install --no-deps --no-build-isolation natten==0.21.7` installs it on CPU)."""
from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as in tests/test_triton.py

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import patterngen as pg
from tests.strategies import scaled, shapes

natten_flex = pytest.importorskip("natten.backends.flex")


def natten_dense_mask(shape, kernel_size, stride, dilation, is_causal):
    n = math.prod(shape)
    bm = natten_flex.get_na_flex_mask("cpu", len(shape), tuple(shape), tuple(kernel_size),
                                      tuple(stride), tuple(dilation), tuple(is_causal))
    z = torch.zeros((), dtype=torch.long)
    return bm.mask_mod(z, z, torch.arange(n)[:, None], torch.arange(n)[None, :]).expand(n, n)


@st.composite
def configs(draw):
    """(shape, size, stride, dilation, causal) per dimension, valid under NATTEN's rules,
    favouring even windows, dilations that do not divide the extent and large strides."""
    shape = draw(shapes())
    size, stride, dilation, causal = [], [], [], []
    for L in shape:
        if L == 1:
            w, d = 1, 1
        else:
            d = draw(st.one_of(st.just(1), st.integers(1, max(1, L // 2))))
            w = draw(st.one_of(st.integers(2, L // d), st.sampled_from([v for v in (2, 4, 6) if v * d <= L] or [L // d])))
        s = draw(st.one_of(st.integers(1, w), st.just(w), st.just(1)))
        size.append(w)
        stride.append(s)
        dilation.append(d)
        causal.append(draw(st.booleans()))
    return shape, tuple(size), tuple(stride), tuple(dilation), tuple(causal)


def check(shape, size, stride, dilation, causal):
    ours = pg.dense_mask(pg.Spec(pg.Window(size, stride, dilation, causal), shape))[0]
    theirs = natten_dense_mask(shape, size, stride, dilation, causal)
    if not torch.equal(ours, theirs):
        bad = torch.nonzero(ours != theirs)[:5].tolist()
        raise AssertionError(f"Window({size}, {stride}, {dilation}, {causal}) on {shape}: (q, kv) that differ "
                             f"from NATTEN: {bad}")


@settings(max_examples=scaled(300))
@given(configs())
@example(((13,), (4,), (3,), (3,), (False,)))            # even window, dilation not dividing 13
@example(((13,), (4,), (4,), (3,), (True,)))
@example(((9, 10), (2, 4), (2, 3), (4, 2), (True, False)))
@example(((5, 6, 7), (2, 4, 3), (1, 4, 2), (2, 1, 2), (False, True, True)))
@example(((1, 7, 3), (1, 6, 3), (1, 5, 3), (1, 1, 1), (True, False, False)))
def test_window_matches_natten(cfg):
    check(*cfg)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_window_matches_natten_sweep(ndim):
    """A fixed sweep of windows on one odd-sized grid per rank (all strides, causal both ways)."""
    shape = {1: (23,), 2: (7, 9), 3: (5, 4, 6)}[ndim]
    for w in (2, 3, 4):
        for d in (1, 2):
            if w * d > min(shape):
                continue
            for s in range(1, w + 1):
                for causal in (False, True):
                    dims = (w,) * ndim
                    cz = tuple(causal if k % 2 == 0 else not causal for k in range(ndim))
                    check(shape, dims, (s,) * ndim, (d,) * ndim, cz)


# -- the generated kernels against NATTEN's own mask ---------------------------------------
# The kernels' mask and bounds code is emitted from the same window rule as the oracle
# (patterngen.core.semantics), so oracle-based kernel tests cannot see a mistake in the rule
# itself; these cases compare kernel outputs with NATTEN's definition directly, on the
# table walk (flat tiles) and the table-free window walk (box tiles).
KERNEL_CASES = [  # shape, size, stride, dilation, causal, (q tile, kv tile)
    ((13,), (4,), (3,), (3,), (False,), (16, 16)),
    ((13,), (4,), (4,), (3,), (True,), (16, 16)),
    ((9, 10), (2, 4), (2, 3), (4, 2), (True, False), (16, 16)),
    ((16, 16), (5, 7), (1, 2), (1, 1), (False, False), ((4, 4), (4, 4))),
    ((10, 9), (4, 3), (2, 3), (1, 1), (True, False), ((4, 4), (4, 4))),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("shape, size, stride, dilation, causal, tiles", KERNEL_CASES)
def test_kernel_forward_matches_natten(shape, size, stride, dilation, causal, tiles):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from patterngen.backends.triton import TritonForward
    spec = pg.Spec(pg.Window(size, stride, dilation, causal), shape, head_dim=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, spec.nq, 16, generator=g) for _ in range(3))
    out, _ = TritonForward(spec, pg.Tiling(*tiles))(q, k, v, scale=0.3)
    mask = natten_dense_mask(shape, size, stride, dilation, causal)
    s = (q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    want = (torch.softmax(s, -1).nan_to_num(0.0) @ v.double()).float()
    assert (out - want).abs().max() < 1e-4
